// The texts of a job's examples, from the spec the scheduler stored (GET /api/jobs/{id}/spec):
// the result carries example ids only, and the heatmap and top lists show the texts.

import { api } from "./api.js";

// {train: {id: {prompt, answer}}, eval: {...}}, or null when the spec cannot be read.
export async function specTexts(jobId) {
  try {
    const spec = await api("GET", `/api/jobs/${encodeURIComponent(jobId)}/spec`);
    return {
      train: Object.fromEntries(spec.training_data.map((e) => [e.id, { prompt: e.prompt, answer: e.completion }])),
      eval: Object.fromEntries(spec.eval_data.map((e) => [e.id, { prompt: e.prompt, answer: e.expected }])),
    };
  } catch {
    return null;
  }
}
