// The detail view's content checks: the HTML preview at phone, tablet and desktop widths
// (with a Chromium screenshot at that width), and the "Checks" tab: caniemail compatibility
// per client family and per feature with its lines, and the link check, on demand only
// since it makes requests from this machine to every URL in the email.
// Like everything here, what the email or the check says goes in as text.

import { apiPath, h } from "./dom.js";
import * as api from "./api.js";

export const WIDTHS = [
  { name: "Phone", width: 375 },
  { name: "Tablet", width: 768 },
  { name: "Desktop", width: null }, // the pane's width
];

/** Width buttons for the HTML view's `frame`, and a link to its screenshot at that width. */
export function previewBar(uuid, frame) {
  const shot = h("a", { class: "button screenshot", target: "_blank", rel: "noopener" },
    "Screenshot");
  const bar = h("div", { class: "preview-widths", role: "group", "aria-label": "Preview width" });
  const choose = (choice) => {
    frame.style.width = choice.width ? `${choice.width}px` : "100%";
    frame.closest(".html-view")?.classList.toggle("narrow", Boolean(choice.width));
    shot.href = `${apiPath("messages", uuid, "screenshot.png")}?width=${choice.width || 1024}`;
    for (const button of bar.querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.width === String(choice.width)));
    }
  };
  for (const choice of WIDTHS) {
    bar.append(h("button", { type: "button", dataset: { width: String(choice.width) },
      title: choice.width ? `${choice.width} px wide` : "As wide as the pane",
      onclick: () => choose(choice) }, choice.name));
  }
  bar.append(h("span", { class: "spacer" }), shot);
  choose(WIDTHS[WIDTHS.length - 1]);
  return bar;
}

/** The "Checks" tab. */
export function checksPanel(event) {
  const hasHtml = Boolean(event.message?.html);
  return h("div", { class: "checks" },
    h("h3", {}, "HTML compatibility"),
    hasHtml ? htmlCheck(event.uuid)
      : h("p", { class: "muted" }, "This email has no HTML body."),
    h("h3", {}, "Links"),
    linkCheck(event.uuid));
}

// ---- HTML check -------------------------------------------------------------------------

function htmlCheck(uuid) {
  const out = h("div", { class: "html-check" }, h("p", { class: "muted" }, "Checking…"));
  api.htmlCheck(uuid).then(
    (result) => out.replaceChildren(...htmlCheckResult(result)),
    (error) => out.replaceChildren(h("p", { class: "error-text" },
      `The HTML check failed: ${error.message}`)),
  );
  return out;
}

function htmlCheckResult(result) {
  const total = result.Total;
  const warnings = result.Warnings || [];
  return [
    h("p", { class: "check-total" },
      scoreBar(total),
      ` ${pct(total.Supported)} supported overall: ${warnings.length} features found in `
      + `${total.Nodes} elements (caniemail data, weighted as Mailpit weighs it).`),
    h("table", { class: "families" },
      h("thead", {}, h("tr", {}, ["Client", "Supported", "Partial", "Not supported", "", "Features tested"]
        .map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, (result.Families || []).map((family) =>
        h("tr", { dataset: { family: family.Family } },
          h("th", { scope: "row" }, family.Name),
          h("td", {}, pct(family.Supported)),
          h("td", {}, pct(family.Partial)),
          h("td", {}, pct(family.Unsupported)),
          h("td", {}, scoreBar(family)),
          h("td", { class: "muted" }, String(family.Features)))))),
    h("ul", { class: "features" }, warnings.map(feature)),
  ];
}

function feature(warning) {
  const score = warning.Score;
  const lines = [...new Set(warning.Lines || [])];
  const unsupported = warning.Results.filter((r) => r.Support !== "yes");
  return h("li", { class: "feature", dataset: { slug: warning.Slug } },
    h("details", {},
      h("summary", {},
        scoreBar(score), " ",
        h("strong", {}, warning.Title), " ",
        h("span", { class: "muted" },
          `${warning.Category}, ${pct(score.Supported)} supported, `
          + `line${lines.length === 1 ? "" : "s"} ${lines.join(", ")}`)),
      h("p", {}, plainText(warning.Description), " ",
        h("a", { href: warning.URL, target: "_blank", rel: "noopener noreferrer" },
          "caniemail")),
      unsupported.length
        ? h("ul", { class: "clients" }, unsupported.map((r) => h("li", {},
          `${r.Name}: ${r.Support === "no" ? "not supported" : "partial"}`,
          r.NoteNumber ? ` (${plainText(warning.NotesByNumber[r.NoteNumber] || "")})` : "")))
        : h("p", { class: "muted" }, "Supported by every client tested.")));
}

function scoreBar(score) {
  const bar = h("span", { class: "score-bar", title: `${pct(score.Supported)} supported, `
    + `${pct(score.Partial)} partial, ${pct(score.Unsupported)} not supported` });
  for (const [kind, value] of [["yes", score.Supported], ["partial", score.Partial],
    ["no", score.Unsupported]]) {
    const part = h("span", { class: `score-${kind}` });
    part.style.width = `${Number(value) || 0}%`; // CSSOM: the page's CSP refuses style=""
    bar.append(part);
  }
  return bar;
}

function pct(value) {
  return `${Math.round(Number(value) || 0)}%`;
}

/** caniemail's descriptions are HTML: shown as their text (an inert document, no markup). */
function plainText(html) {
  return new DOMParser().parseFromString(String(html), "text/html").body.textContent || "";
}

// ---- link check -------------------------------------------------------------------------

function linkCheck(uuid) {
  const follow = h("input", { type: "checkbox", id: "follow-redirects" });
  const out = h("div", { class: "link-results" });
  const button = h("button", { type: "button", class: "check-links", onclick: async () => {
    button.disabled = true;
    out.replaceChildren(h("p", { class: "muted" }, "Checking links…"));
    try {
      out.replaceChildren(linkTable(await api.linkCheck(uuid, follow.checked)));
    } catch (error) {
      out.replaceChildren(h("p", { class: "error-text" }, `The link check failed: ${error.message}`));
    } finally {
      button.disabled = false;
    }
  } }, "Check links");
  return h("div", { class: "link-check" },
    h("p", { class: "muted" }, "Sends a HEAD request (GET if refused) from this machine to "
      + "every http(s) link and image in the email."),
    h("div", { class: "link-tools" }, button,
      h("label", { for: "follow-redirects" }, follow, " follow redirects")),
    out);
}

function linkTable(result) {
  const links = result.Links || [];
  if (links.length === 0) return h("p", { class: "muted" }, "No http(s) links in this email.");
  return h("div", {},
    h("p", { class: "link-summary" }, `${links.length} link${links.length === 1 ? "" : "s"}, `
      + `${result.Errors} error${result.Errors === 1 ? "" : "s"}`),
    h("table", { class: "links" },
      h("thead", {}, h("tr", {}, ["Status", "", "URL"].map((n) => h("th", { scope: "col" }, n)))),
      h("tbody", {}, links.map((link) => h("tr", {
        class: link.StatusCode === 0 || link.StatusCode >= 400 ? "bad" : "good" },
      h("td", { class: "status-code" }, link.StatusCode ? String(link.StatusCode) : "—"),
      h("td", {}, link.Status),
      h("td", { class: "url" }, link.URL))))));
}
