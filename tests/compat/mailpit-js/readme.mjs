// The examples of mailpit-api's README, as written there but for the base URL: the first
// (send a message, list, delete all), then the Playwright fixture's body (clear the mailbox,
// let "the app" send its welcome email, wait for it, check its addresses and subject). The
// app's part is swaks, a real SMTP client.
// Input: {base, smtpPort} as argv[2]; output: JSON of what the examples saw.
import { execFileSync } from "node:child_process";
import { MailpitClient } from "mailpit-api";

const { base, smtpPort } = JSON.parse(process.argv[2]);
function expect(actual) {
  return { toBe(wanted) { if (actual !== wanted) throw new Error(`${actual} !== ${wanted}`); } };
}

// "Example": initialize the API client, send a message, get a summary of all messages,
// delete all messages.
const mailpit = new MailpitClient(base);
const sent = await mailpit.sendMessage({
  From: { Email: "user@example.test" },
  To: [{ Email: "rec@example.test" }],
  Subject: "Test Email",
});
const firstList = await mailpit.listMessages();
await mailpit.deleteMessages();

// fixtures.ts: `const mailpit = new MailpitClient(...); await mailpit.deleteMessages();`
await mailpit.deleteMessages();

// tests/register.spec.ts: the registration sends the welcome email...
execFileSync("swaks", [
  "--server", "127.0.0.1", "--port", String(smtpPort), "--silent", "2",
  "--from", "no-reply@your-app.test", "--to", "test@example.test",
  "--header", "Subject: Welcome to Our App", "--body", "Thanks for registering.",
]);

// ...and the test waits for it (up to 5 seconds by default).
const message = await mailpit.waitForMessage({
  query: "subject:Welcome to Our App",
});

expect(message.To[0].Address).toBe("test@example.test");
expect(message.From.Address).toBe("no-reply@your-app.test");
expect(message.Subject).toBe("Welcome to Our App");

// "Get a summary of all messages", then "Delete all messages".
const messages = await mailpit.listMessages();
await mailpit.deleteMessages();
const after = await mailpit.listMessages();

console.log(JSON.stringify({
  sent, firstList, message, listed: messages.messages_count, after: after.total,
}));
