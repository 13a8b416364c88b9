// The Spam tab: the email's SpamAssassin score and every rule that fired, asked of the
// server (GET .../spam-check) when the tab is shown, and again on "Check again": each
// check is a round trip to spamd, so nothing runs for emails nobody looks at. Rule names
// and descriptions come from spamd (and quote the sender): text nodes only.

import { h } from "./dom.js";
import * as api from "./api.js";

/** The panel for one email; it fills itself in when the check answers. */
export function spamPanel(uuid) {
  const panel = h("div", { class: "spam", "aria-live": "polite" });
  const run = () => {
    panel.replaceChildren(h("p", { class: "muted spam-pending" }, "Checking with SpamAssassin…"));
    api.spamCheck(uuid).then(
      (result) => panel.replaceChildren(...report(result, run)),
      (error) => panel.replaceChildren(failure(error, run)),
    );
  };
  run();
  return panel;
}

function report(result, run) {
  const verdict = result.is_spam ? "spam" : "not spam";
  const rules = Array.isArray(result.rules) ? result.rules : [];
  return [
    h("p", { class: `spam-score ${result.is_spam ? "is-spam" : "not-spam"}` },
      h("strong", { class: "spam-total" }, score(result.score)),
      ` of ${score(result.threshold)} needed: `,
      h("span", { class: "spam-verdict" }, verdict)),
    rules.length
      ? h("table", { class: "headers spam-rules" },
          h("thead", {}, h("tr", {},
            h("th", { scope: "col" }, "Score"),
            h("th", { scope: "col" }, "Rule"),
            h("th", { scope: "col" }, "Description"))),
          h("tbody", {}, rules.map((rule) => h("tr", { class: "spam-rule" },
            h("td", { class: "spam-points" }, score(rule.score)),
            h("td", {}, h("code", {}, rule.name)),
            h("td", {}, rule.description)))))
      : h("p", { class: "muted" }, "No rule fired."),
    again(run),
  ];
}

/** 503: checking is off (no spamassassin.addr); anything else: spamd failed this time. */
function failure(error, run) {
  const off = error.status === 503;
  const reason = String(error.message).replace(/^\d+: /, "");
  return h("div", { class: off ? "spam-off" : "spam-error" },
    h("p", {}, off ? "Spam checking is off: " : "The spam check failed: ", reason),
    off ? null : again(run));
}

function again(run) {
  return h("button", { type: "button", class: "spam-again", onclick: run }, "Check again");
}

function score(value) {
  const number = Number(value);
  return Number.isFinite(number) ? number.toFixed(1) : "?";
}
