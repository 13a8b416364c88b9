// Tags on the page: chips on each list row and in the open email (a click searches
// `tag:NAME`), and the open email's editor (remove a tag, add one). Tag names come from
// senders (plus-addresses) and plugins: they reach the DOM as text only.

import { h } from "./dom.js";

/** The search that finds `tag`: quoted when it holds a space or a quote. */
export function tagQuery(tag) {
  return /[\s"]/.test(tag) ? `tag:"${tag.replaceAll('"', "")}"` : `tag:${tag}`;
}

/** A row's tags: buttons that search for their tag (without opening the email). */
export function rowTags(tags, actions) {
  if (!Array.isArray(tags) || tags.length === 0) return null;
  return h("span", { class: "row-tags" }, tags.map((tag) => h("button", {
    type: "button",
    class: "tag",
    title: `Show emails tagged ${tag}`,
    onclick: (event) => {
      event.stopPropagation();
      actions.searchTag(tag);
    },
  }, tag)));
}

/** The open email's tags, editable: `actions.searchTag(tag)`, `actions.setTags(uuid, tags)`
 * (resolving to the tags the server kept, or undefined when it refused). */
export function tagEditor(event, actions) {
  const list = h("ul", { class: "tags", "aria-label": "Tags" });
  const input = h("input", {
    class: "tag-input",
    type: "text",
    placeholder: "Add tag",
    "aria-label": "Add a tag",
    maxlength: 100,
    autocomplete: "off",
    spellcheck: "false",
  });
  const editor = h("div", { class: "tag-editor", dataset: { uuid: event.uuid } }, list, input);
  let tags = Array.isArray(event.tags) ? [...event.tags] : [];

  const save = async (next) => {
    const kept = await actions.setTags(event.uuid, next);
    if (kept) show(kept);
  };
  const show = (next) => {
    tags = next;
    list.replaceChildren(...tags.map((tag) => h("li", { class: "tag" },
      h("button", { type: "button", class: "tag-name", title: `Show emails tagged ${tag}`,
        onclick: () => actions.searchTag(tag) }, tag),
      // The × is drawn by CSS: the chip's text stays the tag's name.
      h("button", { type: "button", class: "tag-remove", title: `Remove ${tag}`,
        "aria-label": `Remove tag ${tag}`,
        onclick: () => save(tags.filter((t) => t !== tag)) }))));
  };
  input.addEventListener("keydown", (key) => {
    if (key.key !== "Enter") return;
    key.preventDefault();
    key.stopPropagation(); // the page's Enter opens an email
    const tag = input.value.trim();
    if (!tag) return;
    input.value = "";
    if (!tags.some((t) => t.toLowerCase() === tag.toLowerCase())) save([...tags, tag]);
  });
  editor.showTags = show; // live updates (another tab, the API) call this
  show(tags);
  return editor;
}

/** A live `tags` change: the open email's editor shows the new tags. */
export function updateOpenTags(container, data) {
  const editor = container.querySelector(".tag-editor");
  if (editor && editor.dataset.uuid === data.uuid && Array.isArray(data.tags)) {
    editor.showTags(data.tags);
  }
}
