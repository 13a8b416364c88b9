// The npm `mailpit-api` client, unchanged, against mailpipe's Mailpit-compatible API: find
// the message a real mailer sent, read its body, headers, source and attachments, then delete
// it. Input: a JSON object as argv[2] (see tests/test_compat_mailpit.py); output: JSON of what
// the client read, for the Python side to check against what was sent.
import { createHash } from "node:crypto";
import { MailpitClient } from "mailpit-api";

const want = JSON.parse(process.argv[2]);
const mailpit = new MailpitClient(want.base);
const query = `subject:"${want.subject}"`;

function check(ok, what) {
  if (!ok) throw new Error(`check failed: ${what}`);
}

async function sha256(blob) {
  return createHash("sha256").update(Buffer.from(await blob.arrayBuffer())).digest("hex");
}

const message = await mailpit.waitForMessage({ query }, { timeout: 10000, interval: 100 });
check(message.Subject === want.subject, "Subject");
const headers = await mailpit.getMessageHeaders(message.ID);
const source = await mailpit.getMessageSource(message.ID);

const attachments = [];
for (const part of [...message.Attachments, ...message.Inline]) {
  const blob = await mailpit.getMessageAttachment(message.ID, part.PartID);
  const digest = await sha256(blob);
  check(digest === part.Checksums.SHA256, `checksum of part ${part.PartID}`);
  const thumb = await mailpit.getAttachmentThumbnail(message.ID, part.PartID);
  attachments.push({
    PartID: part.PartID, FileName: part.FileName, ContentType: part.ContentType,
    Size: part.Size, type: blob.type, sha256: digest,
    thumbType: thumb.type, thumbSize: thumb.size,
  });
}

const html = await mailpit.renderMessageHTML(message.ID);
const text = await mailpit.renderMessageText(message.ID);
const latest = await mailpit.getMessageSummary();
const found = await mailpit.searchMessages({ query });
await mailpit.setReadStatus({ IDs: [message.ID], Read: false });
const listed = await mailpit.listMessages();
const unreadAgain = listed.messages.find((m) => m.ID === message.ID).Read === false;
const info = await mailpit.getInfo();
const webui = await mailpit.getConfiguration();
const htmlCheck = await mailpit.htmlCheck(message.ID);
const linkCheck = await mailpit.linkCheck(message.ID);
const spamError = await mailpit.spamAssassinCheck(message.ID).then(
  () => "", (error) => error.message);
const chaos = await mailpit.setChaosTriggers({ Recipient: { ErrorCode: 452, Probability: 0 } });
const chaosNow = await mailpit.getChaosTriggers();
const released = await mailpit.releaseMessage(message.ID, { To: [want.releaseTo] });

await mailpit.setTags({ IDs: [message.ID], Tags: ["invoices", "Q3"] });
await mailpit.renameTag("Q3", "Q3 2026");
const tags = await mailpit.getTags();
const tagged = await mailpit.searchMessages({ query: "tag:invoices" });
await mailpit.deleteTag("invoices");
const tagsAfter = (await mailpit.getMessageSummary(message.ID)).Tags;

const deleted = await mailpit.deleteMessages({ IDs: [message.ID] });
const after = await mailpit.waitForMessages({ query, count: 0 }, { timeout: 5000, interval: 100 });

console.log(JSON.stringify({
  message, headers, source, attachments, html, text,
  latestID: latest.ID, searchCount: found.messages_count, searchIDs: found.messages.map((m) => m.ID),
  unreadAgain, infoMessages: info.Messages, webuiRelay: webui.MessageRelay.Enabled,
  linkCheck, spamError, chaos, chaosNow, released,
  htmlCheckTests: htmlCheck.Total.Tests, htmlCheckSlugs: htmlCheck.Warnings.map((w) => w.Slug),
  tags, taggedIDs: tagged.messages.map((m) => m.ID), tagsAfter,
  deleted, countAfter: after.messages_count,
}));
