// Reads a training or eval file (JSONL or CSV) and checks every row against the experiment
// spec (gpu_core/schemas.py) so that mistakes are named by line and field before submitting.

export const KINDS = {
  train: { label: "training", answer: "completion" },
  eval: { label: "eval", answer: "expected" },
};
const MAX_TEXT_CHARS = 20000;
const MAX_ID_CHARS = 128;
const MAX_ERRORS = 20;

// Rows of a CSV text (RFC 4180: quoted fields may hold commas, quotes and newlines), each with
// the line its record starts on.
export function parseCsv(text) {
  const records = [];
  let field = "";
  let record = [];
  let quoted = false;
  let line = 1;
  let recordLine = 1;
  for (let i = 0; i < text.length; i += 1) {
    const ch = text[i];
    if (quoted) {
      if (ch === '"' && text[i + 1] === '"') {
        field += '"';
        i += 1;
      } else if (ch === '"') {
        quoted = false;
      } else {
        if (ch === "\n") line += 1;
        field += ch;
      }
    } else if (ch === '"' && field === "") {
      quoted = true;
    } else if (ch === ",") {
      record.push(field);
      field = "";
    } else if (ch === "\n" || ch === "\r") {
      if (ch === "\r" && text[i + 1] === "\n") i += 1;
      record.push(field);
      records.push({ line: recordLine, values: record });
      record = [];
      field = "";
      line += 1;
      recordLine = line;
    } else {
      field += ch;
    }
  }
  if (quoted) throw new Error(`line ${recordLine}: a quoted field is never closed`);
  if (field !== "" || record.length) {
    record.push(field);
    records.push({ line: recordLine, values: record });
  }
  return records.filter((r) => !(r.values.length === 1 && r.values[0].trim() === ""));
}

function csvRows(text) {
  const records = parseCsv(text);
  if (!records.length) return { rows: [], errors: [] };
  const header = records[0].values.map((name) => name.trim());
  const errors = [];
  const rows = records.slice(1).map(({ line, values }) => {
    if (values.length !== header.length) {
      errors.push(`line ${line}: has ${values.length} fields; the header has ${header.length}`);
    }
    const row = {};
    header.forEach((name, index) => {
      if (values[index] !== undefined && !(name === "id" && values[index] === "")) row[name] = values[index];
    });
    return { line, row };
  });
  return { rows, errors };
}

function jsonlRows(text) {
  const rows = [];
  const errors = [];
  text.split(/\r?\n/).forEach((raw, index) => {
    const line = index + 1;
    if (raw.trim() === "") return;
    let value;
    try {
      value = JSON.parse(raw);
    } catch (error) {
      errors.push(`line ${line}: not valid JSON (${error.message})`);
      return;
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      errors.push(`line ${line}: must be a JSON object with fields, not ${Array.isArray(value) ? "an array" : typeof value}`);
      return;
    }
    rows.push({ line, row: value });
  });
  return { rows, errors };
}

function checkRow(kind, line, row, errors) {
  const answer = KINDS[kind].answer;
  const allowed = ["id", "prompt", answer];
  for (const name of Object.keys(row)) {
    if (!allowed.includes(name)) {
      errors.push(`line ${line}: unknown field "${name}" (allowed: ${allowed.join(", ")})`);
    }
  }
  if (row.id !== undefined && row.id !== null) {
    if (typeof row.id !== "string" || row.id.length === 0 || row.id.length > MAX_ID_CHARS) {
      errors.push(`line ${line}: field "id" must be text of 1-${MAX_ID_CHARS} characters`);
    }
  }
  for (const name of ["prompt", answer]) {
    const value = row[name];
    if (value === undefined || value === null) {
      errors.push(`line ${line}: field "${name}" is missing`);
    } else if (typeof value !== "string") {
      errors.push(`line ${line}: field "${name}" must be text, not ${typeof value}`);
    } else if (name === answer && value.length === 0) {
      errors.push(`line ${line}: field "${name}" is empty`);
    } else if (value.length > MAX_TEXT_CHARS) {
      errors.push(`line ${line}: field "${name}" has ${value.length} characters; the limit is ${MAX_TEXT_CHARS}`);
    }
  }
}

// {examples, errors}: examples as the spec wants them, errors as "line N: field ..." strings.
export function parseExamples(kind, filename, text) {
  const isCsv = /\.csv$/i.test(filename);
  let parsed;
  try {
    parsed = isCsv ? csvRows(text) : jsonlRows(text);
  } catch (error) {
    return { examples: [], errors: [error.message] };
  }
  const errors = [...parsed.errors];
  const seen = new Map();
  for (const { line, row } of parsed.rows) {
    checkRow(kind, line, row, errors);
    if (typeof row.id === "string" && row.id) {
      if (seen.has(row.id)) errors.push(`line ${line}: field "id" repeats "${row.id}" (first on line ${seen.get(row.id)})`);
      else seen.set(row.id, line);
    }
  }
  if (!parsed.rows.length && !errors.length) {
    errors.push(`the file has no ${KINDS[kind].label} examples`);
  }
  const answer = KINDS[kind].answer;
  const examples = parsed.rows.map(({ row }) => {
    const example = { prompt: row.prompt, [answer]: row[answer] };
    if (typeof row.id === "string" && row.id) example.id = row.id;
    return example;
  });
  const lineOf = (text) => Number((/^line (\d+)/.exec(text) || [0, 0])[1]);
  errors.sort((a, b) => lineOf(a) - lineOf(b));
  const shown = errors.slice(0, MAX_ERRORS);
  if (errors.length > MAX_ERRORS) shown.push(`… and ${errors.length - MAX_ERRORS} more problems`);
  return { examples, errors: shown };
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
