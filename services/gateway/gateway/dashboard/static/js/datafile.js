// Training and eval files are read by the gateway (POST /api/data/parse, gpu_core's one parser:
// JSONL, CSV, Parquet; prompt/completion, chat messages, Alpaca), so the page, the API and the
// CLI accept the same files and name the same problems (line or row, and field).

import { api } from "./api.js";

export const KINDS = {
  train: { label: "training", answer: "completion" },
  eval: { label: "eval", answer: "expected" },
};

function problemsOf(error) {
  return error.problems && error.problems.length
    ? error.problems.map((p) => (p.field ? `${p.field}: ${p.message}` : p.message))
    : [error.message];
}

// {examples, format, formatLabel, errors, dataset}: errors as "line N: field ..." strings. A file
// too large to carry in a spec (the gateway answers 413: over the inline limits) is stored once
// instead (POST /api/datasets, streamed, counted there) and named by id: `dataset` is
// {id, count}, `examples` null.
export async function readDataFile(kind, file) {
  const query = `kind=${kind}&filename=${encodeURIComponent(file.name)}`;
  try {
    const answer = await api("POST", `/api/data/parse?${query}`, { body: file });
    return { examples: answer.examples, format: answer.format, formatLabel: answer.format_label, errors: [], dataset: null };
  } catch (error) {
    if (error.status !== 413) return { examples: [], format: null, formatLabel: null, errors: problemsOf(error), dataset: null };
  }
  try {
    const stored = await api("POST", `/api/datasets?${query}`, { body: file });
    return { examples: null, format: stored.format, formatLabel: stored.format_label, errors: [],
      dataset: { id: stored.dataset_id, count: stored.count } };
  } catch (error) {
    return { examples: [], format: null, formatLabel: null, errors: problemsOf(error), dataset: null };
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
