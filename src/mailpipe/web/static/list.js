// The email list: one page of summaries from the API (newest first), rebuilt on every
// refresh. Paging keeps the DOM at one page whatever the store holds (50,000 emails cost
// what 50 do), and the API's offset/limit does the rest.

import { formatShortTime, formatSize, h } from "./dom.js";
import { rowTags } from "./tags.js";

export const PAGE_SIZE = 50;

/** The sender as a person reads it: the From header, else the envelope sender. */
export function senderOf(summary) {
  return summary.header_from || summary.from || "(no sender)";
}

function recipientsOf(summary) {
  const to = summary.to || [];
  if (to.length === 0) return "";
  return to.length === 1 ? to[0] : `${to[0]} +${to.length - 1}`;
}

function row(summary, actions) {
  const unread = summary.read === false;
  const attachments = Number(summary.attachments) || 0;
  return h(
    "li",
    {
      class: unread ? "row unread" : "row",
      dataset: { uuid: summary.uuid },
      onclick: () => actions.open(summary.uuid),
    },
    h("span", { class: "dot", title: unread ? "Unread" : "Read" }),
    h(
      "div",
      { class: "main" },
      h("div", { class: "line" },
        h("span", { class: "from" }, senderOf(summary)),
        h("span", { class: "to" }, recipientsOf(summary))),
      h("div", { class: "line" },
        h("span", { class: "subject" }, summary.subject ?? "(no subject)"),
        h("span", { class: "snippet" }, summary.snippet || "")),
      rowTags(summary.tags, actions),
    ),
    h(
      "div",
      { class: "meta" },
      h("time", { datetime: summary.received_at }, formatShortTime(summary.received_at)),
      h("span", { class: "size" },
        attachments ? h("span", { class: "clip", title: `${attachments} attachment(s)`,
          "aria-label": `${attachments} attachment(s)` }) : "",
        formatSize(summary.size)),
    ),
    h("button", {
      type: "button",
      class: "row-delete",
      title: "Delete",
      "aria-label": "Delete this email",
      onclick: (event) => {
        event.stopPropagation();
        actions.remove(summary.uuid);
      },
    }, "×"),
  );
}

/** Replace the list's rows with `summaries`, marking `openUuid` and `selected`. */
export function renderList(listEl, summaries, { openUuid, selected }, actions) {
  listEl.replaceChildren(...summaries.map((s) => row(s, actions)));
  markRows(listEl, { openUuid, selected });
}

export function markRows(listEl, { openUuid, selected }) {
  [...listEl.children].forEach((li, i) => {
    li.classList.toggle("open", li.dataset.uuid === openUuid);
    li.classList.toggle("selected", i === selected);
    li.setAttribute("aria-selected", String(i === selected));
  });
  const current = listEl.children[selected];
  if (current) current.scrollIntoView({ block: "nearest" });
}

export function pageInfo({ offset, count, total }) {
  if (!total) return "";
  return `${(offset + 1).toLocaleString()}–${(offset + count).toLocaleString()} of ${total.toLocaleString()}`;
}
