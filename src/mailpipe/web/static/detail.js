// One email: its HTML in a sandboxed iframe, text, headers, raw source, attachments,
// envelope and AUTH, transcript, sink outcomes and plugin tags. Everything captured goes
// in as text; the only markup that renders is the HTML body, inside an iframe that may run
// no script, has no origin of its own to read ours, and cannot navigate this page.

import { apiPath, formatFullTime, formatSize, h } from "./dom.js";
import * as api from "./api.js";
import { checksPanel, previewBar } from "./checks.js";
import { spamPanel } from "./spam.js";
import { tagEditor } from "./tags.js";

const SANDBOX = "allow-popups allow-popups-to-escape-sandbox";

/** The detail pane's content for `event`; `actions` = {close, remove, toggleRead, searchTag,
 * setTags}. */
export function renderDetail(event, actions) {
  const message = event.message || {};
  const tabs = tabList(event);
  const body = h("div", { class: "tab-body" });
  const nav = h("nav", { class: "tabs", role: "tablist" });
  const show = (name) => {
    for (const button of nav.children) {
      button.setAttribute("aria-selected", String(button.dataset.tab === name));
    }
    body.replaceChildren(tabs.get(name)());
  };
  for (const name of tabs.keys()) {
    nav.append(h("button", { type: "button", role: "tab", dataset: { tab: name },
      onclick: () => show(name) }, name));
  }
  const article = h(
    "article",
    { class: "email", dataset: { uuid: event.uuid } },
    heading(event, actions),
    attachmentList(event),
    nav,
    body,
  );
  show(message.html ? "HTML" : "Text");
  return article;
}

function heading(event, actions) {
  const message = event.message || {};
  const envelope = event.envelope || {};
  const from = headerValue(message, "from") || envelope.from || "(no sender)";
  const to = headerValue(message, "to") || (envelope.to || []).join(", ");
  return h(
    "header",
    { class: "email-head" },
    h("div", { class: "email-actions" },
      h("button", { type: "button", class: "back", onclick: actions.close }, "← Back"),
      h("span", { class: "spacer" }),
      // Its label follows the list's read state (app.js).
      h("button", { type: "button", class: "toggle-read",
        onclick: () => actions.toggleRead(event.uuid) }, "Mark unread"),
      h("a", { class: "button", href: apiPath("messages", event.uuid, "raw"), download: "" },
        "Download .eml"),
      h("button", { type: "button", class: "danger delete",
        onclick: () => actions.remove(event.uuid) }, "Delete")),
    h("h2", { class: "email-subject" }, message.subject ?? "(no subject)"),
    h("dl", { class: "email-meta" },
      h("dt", {}, "From"), h("dd", {}, from),
      h("dt", {}, "To"), h("dd", {}, to),
      h("dt", {}, "Date"), h("dd", {}, formatFullTime(event.received_at)),
      h("dt", {}, "Size"), h("dd", {}, formatSize(message.size))),
    tagEditor(event, actions),
  );
}

function tagList(tags) {
  if (!Array.isArray(tags) || tags.length === 0) return null;
  return h("ul", { class: "tags", "aria-label": "Tags" },
    tags.map((tag) => h("li", { class: "tag" }, tag)));
}

/** The first value of a header, matched case-insensitively (senders spell names freely). */
function headerValue(message, name) {
  for (const [key, value] of headerLines(message)) {
    if (key.toLowerCase() === name) return value;
  }
  return null;
}

function headerLines(message) {
  if (Array.isArray(message.header_list)) return message.header_list;
  return Object.entries(message.headers || {});
}

/** Tab name -> a function building its panel (called when the tab is shown, so the raw
 * source and the iframe load only when asked for). */
function tabList(event) {
  const message = event.message || {};
  const tabs = new Map();
  if (message.html) tabs.set("HTML", () => htmlView(event.uuid));
  tabs.set("Text", () => pre(message.text ?? "(this email has no text part)", "text-body"));
  tabs.set("Headers", () => headersTable(headerLines(message)));
  tabs.set("Raw", () => rawView(event.uuid));
  tabs.set("Envelope", () => envelopePanel(event));
  const transcript = event.session?.transcript;
  if (Array.isArray(transcript)) tabs.set("Transcript", () => pre(transcript.join("\n"), "transcript"));
  tabs.set("Outcomes", () => outcomesPanel(event));
  tabs.set("Checks", () => checksPanel(event));
  tabs.set("Spam", () => spamPanel(event.uuid));
  return tabs;
}

function pre(text, className) {
  return h("pre", { class: className }, text);
}

function htmlView(uuid) {
  const frame = h("iframe", {
    class: "html-frame",
    sandbox: SANDBOX, // set before src: the first load is already sandboxed
    referrerpolicy: "no-referrer",
    title: "HTML body",
  });
  frame.src = `${apiPath("messages", uuid, "html")}?remote=0`;
  const notice = h("div", { class: "remote-notice", hidden: true });
  api.blockedRemote(uuid).then((blocked) => {
    if (!blocked) return;
    notice.replaceChildren(
      `${blocked} remote resource${blocked === 1 ? "" : "s"} blocked. `,
      h("button", { type: "button", class: "show-remote", onclick: () => {
        frame.src = `${apiPath("messages", uuid, "html")}?remote=1`;
        notice.hidden = true;
      } }, "Show remote images"),
    );
    notice.hidden = false;
  }, () => {}); // no header, no notice: the view itself still works
  return h("div", { class: "html-view" }, previewBar(uuid, frame), notice, frame);
}

function headersTable(lines) {
  return h("table", { class: "headers" },
    h("tbody", {}, lines.map(([name, value]) =>
      h("tr", {}, h("th", { scope: "row" }, name), h("td", {}, value)))));
}

function rawView(uuid) {
  const out = pre("Loading…", "raw");
  api.getRaw(uuid).then(
    (text) => { out.textContent = text; },
    (error) => { out.textContent = `Could not load the raw source: ${error.message}`; },
  );
  return out;
}

function definitions(pairs) {
  return h("dl", { class: "pairs" }, pairs
    .filter(([, value]) => value !== undefined && value !== null && value !== "")
    .map(([name, value]) => [h("dt", {}, name), h("dd", {}, value)]));
}

function listOrNone(items) {
  return Array.isArray(items) && items.length ? items.join("\n") : null;
}

function envelopePanel(event) {
  const envelope = event.envelope || {};
  const session = event.session || {};
  const auth = event.authentication || {};
  return h("div", { class: "envelope" },
    h("h3", {}, "Envelope"),
    definitions([
      ["MAIL FROM", envelope.from === "" ? "<> (null sender)" : envelope.from],
      ["RCPT TO", listOrNone(envelope.to)],
      ["HELO", envelope.helo],
      ["MAIL options", listOrNone(envelope.mail_options)],
      ["Client", event.remote_addr],
      ["Server", session.local_addr],
      ["Listener", session.server],
      ["TLS", session.tls === undefined ? null : session.tls ? "yes" : "no"],
      ["Session", session.uuid],
      ["Violations", listOrNone(session.violations)],
      ["Received", formatFullTime(event.received_at)],
      ["Email uuid", event.uuid],
    ]),
    h("h3", {}, "AUTH"),
    auth.attempted
      ? definitions([
          ["Mechanism", auth.mechanism],
          ["Username", auth.username],
          ["Password", auth.password],
        ])
      : h("p", { class: "muted" }, "The client did not authenticate."));
}

function outcomesPanel(event) {
  const outcomes = event.mailpipe?.outcomes || {};
  const names = Object.keys(outcomes);
  return h("div", { class: "outcomes" },
    h("h3", {}, "Sinks"),
    names.length
      ? definitions(names.map((name) => [name, describe(outcomes[name])]))
      : h("p", { class: "muted" }, "No sink noted anything about this email."),
    h("h3", {}, "Tags"),
    tagList(event.tags) || h("p", { class: "muted" }, "No tags."));
}

function describe(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

function attachmentList(event) {
  const attachments = event.attachments || [];
  if (attachments.length === 0) return null;
  return h("ul", { class: "attachments", "aria-label": "Attachments" },
    attachments.map((meta, index) => attachmentItem(event.uuid, meta, index)));
}

function attachmentItem(uuid, meta, index) {
  const url = apiPath("messages", uuid, "attachments", index);
  const type = String(meta.content_type || "application/octet-stream");
  const name = meta.filename || `attachment-${index}`;
  // An unnamed part with a Content-ID is an image the HTML shows inline (cid:).
  const inline = !meta.filename && meta.content_id ? ", inline" : "";
  return h("li", { class: "attachment" },
    type.startsWith("image/") ? h("img", { src: url, alt: name, loading: "lazy" }) : null,
    h("a", { href: url, download: name, class: "attachment-link" }, name),
    h("span", { class: "muted" }, `${type}, ${formatSize(meta.size)}${inline}`));
}
