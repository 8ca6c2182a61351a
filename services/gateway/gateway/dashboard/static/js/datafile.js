// Training and eval files are read by the gateway (POST /api/data/parse, gpu_core's one parser:
// JSONL, CSV, Parquet; prompt/completion, chat messages, Alpaca), so the page, the API and the
// CLI accept the same files and name the same problems (line or row, and field).

import { api } from "./api.js";

export const KINDS = {
  train: { label: "training", answer: "completion" },
  eval: { label: "eval", answer: "expected" },
};

// {examples, format, formatLabel, errors}: errors as "line N: field ..." strings.
export async function readDataFile(kind, file) {
  const path = `/api/data/parse?kind=${kind}&filename=${encodeURIComponent(file.name)}`;
  try {
    const answer = await api("POST", path, { body: file });
    return { examples: answer.examples, format: answer.format, formatLabel: answer.format_label, errors: [] };
  } catch (error) {
    const errors = error.problems && error.problems.length
      ? error.problems.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message))
      : [error.message];
    return { examples: [], format: null, formatLabel: null, errors };
  }
}

// The ids the server gives examples without one (gpu_core _fill_ids): t1, t2, ... / e1, e2, ...
export function withIds(examples, prefix) {
  const taken = new Set(examples.filter((e) => e.id).map((e) => e.id));
  return examples.map((example, index) => {
    if (example.id) return example;
    let candidate = `${prefix}${index + 1}`;
    for (let n = 2; taken.has(candidate); n += 1) candidate = `${prefix}${index + 1}-${n}`;
    taken.add(candidate);
    return { ...example, id: candidate };
  });
}
