// The texts of a job's examples, from the spec the scheduler stored (GET /api/jobs/{id}/spec):
// the result carries example ids only, and the heatmap and top lists show the texts.

import { api } from "./api.js";

// {train: {id: {prompt, answer}}, eval: {...}}, or null when the spec cannot be read.
export async function specTexts(jobId) {
  try {
    const spec = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/spec`);
    return {
      train: Object.fromEntries(spec.training_data.map((e) => [e.id, exampleText(e, e.completion)])),
      eval: Object.fromEntries(spec.eval_data.map((e) => [e.id, exampleText(e, e.expected)])),
    };
  } catch {
    return null;
  }
}

// A chat example reads as its turns before the last assistant turn (system left out), " / "
// between turns, and that assistant turn as the answer.
function exampleText(example, answer) {
  if (!example.messages) return { prompt: example.prompt, answer };
  const last = example.messages.map((m) => m.role).lastIndexOf("assistant");
  const before = example.messages.slice(0, last).filter((m) => m.role !== "system");
  return { prompt: before.map((m) => m.content).join(" / "), answer: example.messages[last].content };
}
