// The REST API and its event stream, by relative URL: the page works under any
// http.base_path, and the browser adds the credentials itself: basic auth's, or the
// session cookie that signing in with the bearer token set (HttpOnly: never seen here).

import { apiPath } from "./dom.js";

export class ApiError extends Error {
  constructor(message, status = 0, challenge = "") {
    super(message);
    this.status = status;
    this.challenge = challenge;
  }

  /** A 401 the page can answer by asking for the bearer token. */
  get wantsToken() {
    return this.status === 401 && /^bearer\b/i.test(this.challenge);
  }
}

async function call(method, path, body) {
  const init = { method, headers: { Accept: "application/json" } };
  if (body !== undefined) {
    // The guard refuses state changes with a body that is not JSON.
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (!response.ok) {
    const challenge = response.headers.get("WWW-Authenticate") || "";
    throw new ApiError(await errorOf(response), response.status, challenge);
  }
  return response.status === 204 ? null : response;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && typeof body.error === "string") return `${response.status}: ${body.error}`;
  } catch {
    // not JSON: say what we know
  }
  return `${response.status} ${response.statusText}`;
}

export async function listMessages({ q, offset, limit }) {
  const params = new URLSearchParams({ offset: String(offset), limit: String(limit) });
  if (q) params.set("q", q);
  return (await call("GET", `${apiPath("messages")}?${params}`)).json();
}

export async function getMessage(uuid) {
  return (await call("GET", apiPath("messages", uuid))).json();
}

export async function getRaw(uuid) {
  return (await call("GET", apiPath("messages", uuid, "raw"))).text();
}

/** How many remote resources the safe HTML view blocked (its response header). */
export async function blockedRemote(uuid) {
  const response = await call("HEAD", `${apiPath("messages", uuid, "html")}?remote=0`);
  return Number(response.headers.get("X-Mailpipe-Blocked-Remote")) || 0;
}

/** The email's SpamAssassin score and rules (a round trip to spamd). */
export async function spamCheck(uuid) {
  return (await call("GET", apiPath("messages", uuid, "spam-check"))).json();
}

export const deleteMessage = (uuid) => call("DELETE", apiPath("messages", uuid));
export const deleteAll = () => call("DELETE", apiPath("messages"));
export const setRead = (uuid, read) => call("PATCH", apiPath("messages", uuid), { read });
export const markAllRead = () => call("PATCH", apiPath("messages"), { read: true });
/** Replace one email's tags; {uuid, tags}: the tags the server kept. */
export async function setTags(uuid, tags) {
  return (await call("PUT", apiPath("messages", uuid, "tags"), { tags })).json();
}

/** The content checks (checks.js): caniemail compatibility; the links, checked on demand. */
export async function htmlCheck(uuid) {
  return (await call("GET", apiPath("messages", uuid, "html-check"))).json();
}
export async function linkCheck(uuid, follow) {
  return (await call("GET", `${apiPath("messages", uuid, "link-check")}?follow=${follow}`)).json();
}

/** Signing in with the bearer token: the server answers with the session cookie. */
export const signIn = (token) => call("POST", apiPath("session"), { token });
export const signOut = () => call("DELETE", apiPath("session"));
/** {auth: "basic" | "bearer" | null, cookie: signed in by cookie} */
export async function session() {
  return (await call("GET", apiPath("session"))).json();
}

/** Server-sent events: `handlers.event(kind, data)` for each, `handlers.state(live)` as
 * the connection comes and goes (EventSource reconnects by itself). */
export function subscribe(handlers) {
  const source = new EventSource(apiPath("events"));
  for (const kind of ["new", "deleted", "cleared", "read", "tags"]) {
    source.addEventListener(kind, (message) => {
      let data = {};
      try {
        data = JSON.parse(message.data);
      } catch {
        return; // a malformed event is dropped, the next refresh corrects the view
      }
      handlers.event(kind, data);
    });
  }
  source.addEventListener("open", () => handlers.state(true));
  source.addEventListener("error", () => handlers.state(false));
  return source;
}
