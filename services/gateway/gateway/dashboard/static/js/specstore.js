// The texts of a submitted experiment's examples, kept in this browser's localStorage: the API's
// job and result answers carry example ids only, and the heatmap and top lists show the texts.

const PREFIX = "influence.spec.";

export function rememberSpec(jobId, spec) {
  const texts = {
    train: Object.fromEntries(spec.training_data.map((e) => [e.id, { prompt: e.prompt, answer: e.completion }])),
    eval: Object.fromEntries(spec.eval_data.map((e) => [e.id, { prompt: e.prompt, answer: e.expected }])),
  };
  try {
    localStorage.setItem(PREFIX + jobId, JSON.stringify(texts));
  } catch {
    // Storage full or disabled: the results still show, with ids instead of texts.
  }
}

// {train: {id: {prompt, answer}}, eval: {...}}, or null when this browser did not submit the job.
export function specTexts(jobId) {
  try {
    return JSON.parse(localStorage.getItem(PREFIX + jobId));
  } catch {
    return null;
  }
}
