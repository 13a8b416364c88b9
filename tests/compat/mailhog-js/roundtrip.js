// The npm `mailhog` client, unchanged, against mailpipe's MailHog-compatible API.
// tests/test_compat_mailhog.py sends the emails over SMTP first and passes what it sent in
// MAILPIPE_EXPECT; this finds, reads, releases and deletes them through the client only, and
// prints what it saw as one JSON line for the Python side to check as well.
'use strict'

const assert = require('node:assert/strict')
const expect = JSON.parse(process.env.MAILPIPE_EXPECT)
const mailhog = require('mailhog')({
  host: '127.0.0.1',
  port: Number(process.env.MAILHOG_PORT),
  basePath: process.env.MAILHOG_BASE_PATH,
  auth: process.env.MAILHOG_AUTH || undefined
})

async function main() {
  const seen = {}
  const all = await mailhog.messages()
  assert.equal(all.total, 3)
  assert.equal(all.count, 3)
  assert.equal(all.start, 0)
  // Newest first, as MailHog sorts them.
  assert.deepEqual(all.items.map(item => item.subject), [
    expect.plain.subject,
    expect.html.subject,
    expect.attached.subject
  ])
  const paged = await mailhog.messages(1, 1)
  assert.equal(paged.total, 3)
  assert.equal(paged.count, 1)
  assert.equal(paged.start, 1)
  assert.equal(paged.items[0].subject, expect.html.subject)

  // UTF-8 in quoted-printable, an attachment in base64.
  const attached = await mailhog.latestFrom(expect.attached.from)
  assert.equal(attached.subject, expect.attached.subject)
  assert.equal(attached.text.trim(), expect.attached.text)
  assert.equal(attached.from, expect.attached.headerFrom)
  assert.equal(attached.to, expect.attached.to)
  assert.ok(attached.date instanceof Date && !isNaN(attached.date))
  assert.ok(attached.deliveryDate instanceof Date && !isNaN(attached.deliveryDate))
  assert.equal(attached.attachments.length, 1)
  const file = attached.attachments[0]
  assert.equal(file.name, expect.attached.filename)
  assert.equal(file.encoding, 'base64')
  assert.match(file.type, /^text\/csv/)
  assert.equal(mailhog.decode(file.Body, file.encoding), expect.attached.attachment)
  seen.attachment = mailhog.decode(file.Body, file.encoding)

  // HTML and text alternatives in base64, an RFC 2047 subject, a Cc.
  const html = await mailhog.latestTo(expect.html.to)
  assert.equal(html.subject, expect.html.subject)
  assert.equal(html.text.trim(), expect.html.text)
  assert.equal(html.html.trim(), expect.html.html)
  assert.equal(html.cc, expect.html.cc)
  assert.equal(html.attachments.length, 0)
  seen.html = html.html.trim()

  // Plain 7-bit, found by a word of its body; and the README's quoted-printable search.
  const plain = await mailhog.latestContaining(expect.plain.word)
  assert.equal(plain.subject, expect.plain.subject)
  assert.equal(plain.text.trim(), expect.plain.text)
  const encoded = mailhog.encode(expect.attached.qpWord, 'quoted-printable')
  const byEncoded = await mailhog.search(encoded)
  assert.equal(byEncoded.total, 1)
  assert.equal(byEncoded.items[0].ID, attached.ID)
  const byDecoded = await mailhog.search(expect.attached.qpWord, 'containing')
  assert.equal(byDecoded.total, 1)
  const nothing = await mailhog.latestContaining('no such text in any message 0xdeadbeef')
  assert.equal(nothing, 0)
  const toAll = await mailhog.search(expect.domain, 'to', 0, 2)
  assert.equal(toAll.total, 3)
  assert.equal(toAll.count, 2)

  // Release: the client posts its JSON without a Content-Type (served: nothing marks it as
  // a browser's), back into mailpipe's own SMTP listener.
  const released = await mailhog.releaseMessage(plain.ID, {
    host: '127.0.0.1',
    port: String(process.env.MAILPIPE_SMTP_PORT),
    email: expect.releaseTo
  })
  assert.equal(released.statusCode, 200)
  // The copy came back through mailpipe's own SMTP listener, to the release's recipient.
  const copy = await mailhog.latestTo(expect.releaseTo)
  assert.equal(copy.subject, expect.plain.subject)
  assert.notEqual(copy.ID, plain.ID)
  assert.equal((await mailhog.deleteMessage(copy.ID)).statusCode, 200)
  seen.release = copy.ID

  // Delete one, then all.
  const deleted = await mailhog.deleteMessage(plain.ID)
  assert.equal(deleted.statusCode, 200)
  assert.equal((await mailhog.messages()).total, 2)
  assert.equal(await mailhog.latestContaining(expect.plain.word), 0)
  const cleared = await mailhog.deleteAll()
  assert.equal(cleared.statusCode, 200)
  const empty = await mailhog.messages()
  assert.equal(empty.total, 0)
  assert.deepEqual(empty.items, [])

  seen.ids = [attached.ID, html.ID, plain.ID]
  seen.text = attached.text.trim()
  console.log(JSON.stringify(seen))
}

main().catch(error => {
  console.error(error)
  process.exit(1)
})
