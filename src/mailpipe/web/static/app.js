// The inbox page: state, refreshes, live updates, keyboard. The list and the detail pane
// render themselves (list.js, detail.js); everything here is wiring.

import * as api from "./api.js";
import { renderDetail } from "./detail.js";
import { PAGE_SIZE, markRows, pageInfo, renderList } from "./list.js";
import { tagQuery, updateOpenTags } from "./tags.js";

const $ = (id) => document.getElementById(id);
const state = {
  q: "",
  offset: 0,
  total: 0,
  unread: null,
  rows: [],
  selected: -1,
  openUuid: null,
};
const actions = {
  open: (uuid) => openEmail(uuid),
  remove: (uuid) => removeEmail(uuid),
  close: () => closeEmail(),
  toggleRead: (uuid) => toggleRead(uuid),
  searchTag: (tag) => searchFor(tagQuery(tag)),
  setTags: async (uuid, tags) => (await run(() => api.setTags(uuid, tags)))?.tags,
};

// ---- refreshing: at most one list request in flight, one more queued -----------------------
// Live events only mark the list stale: the first one reloads at once, the ones after it
// wait for that load and then share one more, at most one every QUIET_MS. A burst of 1,000
// emails costs a handful of list requests, and what is shown always comes from the server
// (search and paging included).

const QUIET_MS = 100;
const pause = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
let busy = null; // a load and the quiet time after it
let queued = null;

/** Reload the current page; the promise settles after a load that began after this call
 * (so a caller that changed the offset sees its page, not the one already loading). */
function refresh() {
  if (!busy) {
    const load = loadList();
    busy = load
      .catch(() => {})
      .then(() => pause(QUIET_MS))
      .finally(() => {
        busy = null;
      });
    return load;
  }
  queued ??= busy.then(() => {
    queued = null;
    return refresh();
  });
  return queued;
}

async function loadList() {
  const { q, offset } = state;
  const page = await run(() => api.listMessages({ q, offset, limit: PAGE_SIZE }));
  // Asked for another page or search meanwhile: that one's load is queued, drop this one.
  if (!page || q !== state.q || offset !== state.offset) return;
  if (page.count === 0 && state.offset > 0 && page.total > 0) {
    // The page emptied under us (deletes): step back to the last page that has emails.
    state.offset = Math.max(0, Math.floor((page.total - 1) / PAGE_SIZE) * PAGE_SIZE);
    return loadList();
  }
  connected();
  const selectedUuid = state.rows[state.selected]?.uuid;
  state.rows = page.messages;
  $("list").dataset.query = q; // which search the rows answer (tests wait on it)
  state.total = page.total;
  state.unread = typeof page.unread === "number" ? page.unread : null;
  const kept = state.rows.findIndex((row) => row.uuid === selectedUuid);
  state.selected = kept >= 0 ? kept : Math.min(state.selected, state.rows.length - 1);
  render();
}

function render() {
  renderList($("list"), state.rows, state, actions);
  $("empty").hidden = state.rows.length > 0;
  $("empty").textContent = state.q ? "No email matches this search." : $("empty").dataset.text;
  $("page-info").textContent = pageInfo({ offset: state.offset, count: state.rows.length, total: state.total });
  $("prev").disabled = state.offset === 0;
  $("next").disabled = state.offset + state.rows.length >= state.total;
  const unread = state.unread ? `, ${state.unread.toLocaleString()} unread` : "";
  $("counts").textContent = `${state.total.toLocaleString()} email${state.total === 1 ? "" : "s"}${unread}`;
  document.title = state.unread ? `(${state.unread}) mailpipe` : "mailpipe";
  syncReadButton();
}

/** The open email's read state as the list last said (an email off this page: read). */
function isRead(uuid) {
  return state.rows.find((row) => row.uuid === uuid)?.read !== false;
}

function syncReadButton() {
  const button = document.querySelector("#detail .toggle-read");
  if (button && state.openUuid) button.textContent = isRead(state.openUuid) ? "Mark unread" : "Mark read";
}

async function toggleRead(uuid) {
  const read = !isRead(uuid);
  const row = state.rows.find((r) => r.uuid === uuid);
  if (row) row.read = read;
  syncReadButton();
  await run(() => api.setRead(uuid, read));
  refresh();
}

// ---- one email ------------------------------------------------------------------------------

let openToken = 0;

async function openEmail(uuid) {
  const token = ++openToken; // a slower, older open must not overwrite a newer one
  state.openUuid = uuid;
  const index = state.rows.findIndex((row) => row.uuid === uuid);
  if (index >= 0) state.selected = index;
  markRows($("list"), state);
  if (location.hash !== `#${uuid}`) history.replaceState(null, "", `#${uuid}`);
  const event = await run(() => api.getMessage(uuid));
  if (!event || token !== openToken) return;
  const summary = state.rows.find((row) => row.uuid === uuid);
  // Unread, or not on this page (a link to #uuid): marked read; shown at once, the
  // server's answer comes with the refresh.
  const mark = summary?.read !== true;
  if (summary) summary.read = true;
  $("detail").replaceChildren(renderDetail(event, actions));
  showDetail(true);
  syncReadButton();
  markRows($("list"), state);
  if (mark) {
    await run(() => api.setRead(uuid, true));
    refresh();
  }
}

function closeEmail() {
  openToken++;
  state.openUuid = null;
  $("detail").replaceChildren();
  showDetail(false);
  history.replaceState(null, "", location.pathname + location.search);
  markRows($("list"), state);
  $("list").focus();
}

function showDetail(open) {
  $("detail").hidden = !open;
  $("placeholder").hidden = open;
  document.body.classList.toggle("detail-open", open);
}

function emailGone(uuid) {
  if (state.openUuid === uuid) closeEmail();
}

async function removeEmail(uuid) {
  if (!uuid) return;
  const index = state.rows.findIndex((row) => row.uuid === uuid);
  if ((await run(() => api.deleteMessage(uuid))) === undefined) return;
  emailGone(uuid);
  if (index >= 0) {
    state.rows.splice(index, 1);
    state.selected = Math.min(index, state.rows.length - 1);
    render();
  }
  refresh();
}

// ---- errors: shown, never thrown at the user as a blank page ---------------------------------

let errorTimer = 0;

/** `fn()`'s result, or undefined after showing its error (or the sign-in form, when the
 * API wants the bearer token). */
async function run(fn) {
  try {
    return await fn();
  } catch (error) {
    if (error instanceof api.ApiError && error.wantsToken) showSignIn();
    else showError(error.message || String(error));
    return undefined;
  }
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  clearTimeout(errorTimer);
  errorTimer = setTimeout(() => { $("error").hidden = true; }, 6000);
}

// ---- live updates -----------------------------------------------------------------------

function onEvent(kind, data) {
  if (kind === "deleted") emailGone(data.uuid);
  if (kind === "tags") updateOpenTags($("detail"), data);
  if (kind === "cleared" && state.openUuid) closeEmail();
  refresh();
}

function onLive(live) {
  $("live").textContent = live ? "live" : "reconnecting…";
  $("live").classList.toggle("on", live);
  // Back after a gap: events may have been missed, so ask for the truth.
  if (live) refresh();
  // Refused (a 401 after a restart signed everyone out, say): EventSource gives up. The
  // list's request says why (and shows the sign-in form if that is it); try again later.
  if (!live && stream?.readyState === EventSource.CLOSED) {
    stream = null;
    refresh();
    setTimeout(() => { if (!signingIn) refresh(); }, 3000);
  }
}

// ---- signing in with the bearer token (basic auth is the browser's own prompt) --------------
// The API answered 401 with a Bearer challenge: the page asks for the token and trades it
// for a session cookie (HttpOnly, SameSite=Strict) that every request after carries: the
// fetches, the event stream, the HTML frame, images and downloads.

let stream = null; // the event stream, opened once the API answered
let signingIn = false;

/** The API answered: open the event stream (once) and learn how we are signed in. */
function connected() {
  if (stream || signingIn) return;
  stream = api.subscribe({ event: onEvent, state: onLive });
  run(api.session).then((session) => {
    if (session) $("sign-out").hidden = !session.cookie;
  });
}

function showSignIn() {
  if (signingIn) return;
  signingIn = true;
  stream?.close();
  stream = null;
  // Nothing captured stays on the page, even hidden.
  openToken++;
  state.openUuid = null;
  Object.assign(state, { rows: [], total: 0, unread: null, selected: -1 });
  $("detail").replaceChildren();
  showDetail(false);
  render();
  $("live").textContent = "offline";
  $("live").classList.remove("on");
  $("error").hidden = true;
  $("sign-out").hidden = true;
  document.body.classList.add("signed-out");
  $("signin").hidden = false;
  $("token").focus();
}

async function submitToken(event) {
  event.preventDefault();
  const token = $("token").value;
  if (!token) return;
  try {
    await api.signIn(token);
  } catch (error) {
    const wrong = error instanceof api.ApiError && error.status === 401;
    $("signin-error").textContent = wrong ? "Wrong token." : error.message || String(error);
    $("signin-error").hidden = false;
    $("token").select();
    return;
  }
  $("token").value = "";
  $("signin-error").hidden = true;
  $("signin").hidden = true;
  document.body.classList.remove("signed-out");
  signingIn = false;
  await refresh();
  const linked = location.hash.slice(1);
  if (linked && !signingIn) openEmail(linked);
}

async function signOut() {
  if ((await run(api.signOut)) === undefined) return;
  showSignIn();
}

// ---- keyboard -----------------------------------------------------------------------------

const KEYS = {
  j: () => move(1),
  ArrowDown: () => move(1),
  k: () => move(-1),
  ArrowUp: () => move(-1),
  Enter: () => state.rows[state.selected] && openEmail(state.rows[state.selected].uuid),
  Delete: () => removeEmail(state.openUuid || state.rows[state.selected]?.uuid),
  Backspace: () => KEYS.Delete(), // a Mac keyboard's delete key
  "/": () => $("search").focus(),
  Escape: () => state.openUuid && closeEmail(),
};

function onKey(event) {
  if (signingIn || event.ctrlKey || event.metaKey || event.altKey) return;
  const inField = event.target instanceof HTMLInputElement;
  if (inField) {
    if (event.key === "Escape" || event.key === "Enter") event.target.blur();
    return;
  }
  const action = KEYS[event.key];
  if (!action) return;
  event.preventDefault();
  action();
}

/** Select the next (1) or previous (-1) row, across pages; an open email follows. */
async function move(step) {
  const next = state.selected + step;
  if (next >= state.rows.length && !$("next").disabled) {
    await turnPage(PAGE_SIZE, 0);
  } else if (next < 0 && state.offset > 0) {
    await turnPage(-PAGE_SIZE, PAGE_SIZE - 1);
  } else {
    state.selected = Math.max(0, Math.min(next, state.rows.length - 1));
    markRows($("list"), state);
  }
  if (state.openUuid && state.rows[state.selected]) openEmail(state.rows[state.selected].uuid);
}

async function turnPage(delta, select) {
  state.offset = Math.max(0, state.offset + delta);
  state.selected = select;
  await refresh();
  state.selected = Math.min(select, state.rows.length - 1);
  markRows($("list"), state);
}

// ---- start --------------------------------------------------------------------------------

/** Show the emails matching `q`, as if typed in the search box. */
function searchFor(q) {
  $("search").value = q;
  state.q = q;
  state.offset = 0;
  state.selected = -1;
  refresh();
}

function wire() {
  $("empty").dataset.text = $("empty").textContent;
  let searchTimer = 0;
  const search = () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(() => {
      const q = $("search").value.trim();
      if (q === state.q) return;
      state.q = q;
      state.offset = 0;
      state.selected = -1;
      refresh();
    }, 150);
  };
  // "search" too: Escape in a search box clears it without an input event.
  $("search").addEventListener("input", search);
  $("search").addEventListener("search", search);
  $("prev").addEventListener("click", () => turnPage(-PAGE_SIZE, 0));
  $("next").addEventListener("click", () => turnPage(PAGE_SIZE, 0));
  $("mark-all").addEventListener("click", () => run(api.markAllRead).then(refresh));
  $("delete-all").addEventListener("click", async () => {
    if (!confirm("Delete every stored email?")) return;
    if ((await run(api.deleteAll)) === undefined) return;
    if (state.openUuid) closeEmail();
    refresh();
  });
  document.addEventListener("keydown", onKey);
  $("signin-form").addEventListener("submit", submitToken);
  $("sign-out").addEventListener("click", signOut);
}

// The first list request opens the event stream, or shows the sign-in form.
wire();
refresh();
const linked = location.hash.slice(1);
if (linked) openEmail(linked);
