// Building the page from captured data: text only, never markup. Every string a sender
// controls (subjects, addresses, headers, file names, bodies) reaches the DOM through
// text nodes, so a "<script>" in a subject is shown, not run.

/** An element with properties and children; strings become text nodes. */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else if (key === "dataset") Object.assign(el.dataset, value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** A same-origin API path: relative (so http.base_path works), every segment encoded. */
export function apiPath(...segments) {
  return "api/v1/" + segments.map((s) => encodeURIComponent(String(s))).join("/");
}

const UNITS = ["B", "KB", "MB", "GB"];

export function formatSize(bytes) {
  let value = Number(bytes) || 0;
  let unit = 0;
  while (value >= 1024 && unit < UNITS.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)} ${UNITS[unit]}`;
}

const TIME = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const DAY = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric" });
const FULL = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });

/** Today's emails by time, older ones by day: the list's column stays narrow. */
export function formatShortTime(iso) {
  const when = new Date(iso);
  if (Number.isNaN(when.getTime())) return "";
  const today = new Date().toDateString() === when.toDateString();
  return today ? TIME.format(when) : DAY.format(when);
}

export function formatFullTime(iso) {
  const when = new Date(iso);
  return Number.isNaN(when.getTime()) ? String(iso ?? "") : FULL.format(when);
}
