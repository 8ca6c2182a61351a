// A finished job's real cost beside its estimate (the job API's `actual`): the GPU-seconds the
// provider measured, the GPU it was billed as and that GPU's rate.

import { duration, usd } from "./ui.js";

function rate(usdPerSecond) {
  return `$${usdPerSecond.toFixed(6)}/s`;
}

// One line for the job page, e.g. "42 s on AMPERE_80 at $0.000760/s = $0.0319 (estimate 38 s on
// AMPERE_80, $0.0289)".
export function actualCostText(job) {
  const estimate = `estimate ${duration(job.estimated_time_s)}${job.estimated_gpu ? ` on ${job.estimated_gpu}` : ""}, ${usd(job.estimated_cost_usd)}`;
  const actual = job.actual;
  if (!actual) {
    return ["completed", "failed", "cancelled"].includes(job.status)
      ? `Not measured (${estimate})`
      : `Shown when the job ends (${estimate})`;
  }
  const device = actual.device && actual.device !== actual.gpu ? ` (${actual.device})` : "";
  return `${actual.gpu_seconds.toFixed(1)} GPU-seconds on ${actual.gpu}${device} at ${rate(actual.usd_per_second)} = ${usd(actual.cost_usd)} (${estimate})`;
}

// The experiments list's cell: the real cost once known.
export function actualCostCell(job) {
  return job.actual ? usd(job.actual.cost_usd) : "—";
}

export function actualCostTitle(job) {
  return job.actual ? `${job.actual.gpu_seconds.toFixed(1)} GPU-s on ${job.actual.gpu}; ${job.actual.source}` : "";
}
