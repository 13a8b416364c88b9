// The examples of the `mailhog` package's README, as written there, against mailpipe: only
// the client's options (host, port, base path) and the release's SMTP port differ, since
// they point at this test's mailpipe. Their console output is captured and printed as one
// JSON object for tests/test_compat_mailhog.py to check.
'use strict'

const lines = []
const console = { log: (...args) => lines.push(args.map(String).join(' ')) }

const mailhog = require('mailhog')({
  host: '127.0.0.1',
  port: Number(process.env.MAILHOG_PORT),
  basePath: process.env.MAILHOG_BASE_PATH,
  auth: process.env.MAILHOG_AUTH || undefined
})

// ---- from the README ---------------------------------------------------------------------

async function exampleMessages() {
  // Retrieve the latest 10 messages:
  const result = await mailhog.messages(0, 10)

  // Log the details of each message to the console:
  for (let item of result.items) {
    console.log('From: ', item.from)
    console.log('To: ', item.to)
    console.log('Subject: ', item.subject)
    console.log('Content: ', item.text)
  }
}

async function exampleSearch() {
  // Search the latest 10 messages containing "banana":
  const result = await mailhog.search('banana', 'containing', 0, 10)

  // Log the details of each message to the console:
  for (let item of result.items) {
    console.log('From: ', item.from)
    console.log('To: ', item.to)
    console.log('Subject: ', item.subject)
    console.log('Content: ', item.text)
  }
}

async function exampleLatestFrom() {
  // Search the latest message from "test@example.org":
  const result = await mailhog.latestFrom('test@example.org')

  // Log the details of this message to the console:
  console.log('From: ', result.from)
  console.log('To: ', result.to)
  console.log('Subject: ', result.subject)
  console.log('Content: ', result.text)
}

async function exampleLatestTo() {
  // Search the latest message to "test@example.org":
  const result = await mailhog.latestTo('test@example.org')

  // Log the details of this message to the console:
  console.log('From: ', result.from)
  console.log('To: ', result.to)
  console.log('Subject: ', result.subject)
  console.log('Content: ', result.text)
}

async function exampleLatestContaining() {
  // Search the latest message containing "banana":
  const result = await mailhog.latestContaining('banana')

  // Log the details of this message to the console:
  console.log('From: ', result.from)
  console.log('To: ', result.to)
  console.log('Subject: ', result.subject)
  console.log('Content: ', result.text)
}

async function exampleRelease() {
  const result = await mailhog.latestTo('test@example.org')

  const response = await mailhog.releaseMessage(result.ID, {
    host: 'localhost',
    port: process.env.MAILPIPE_SMTP_PORT, // the README's '1025'
    email: 'test@example.org'
  })
  console.log('Release: ', response.statusCode)
}

async function exampleDeleteMessage() {
  const result = await mailhog.latestTo('test@example.org')

  const response = await mailhog.deleteMessage(result.ID)

  console.log('Status code: ', response.statusCode)
}

async function exampleDeleteAll() {
  const response = await mailhog.deleteAll()

  console.log('Status code: ', response.statusCode)
}

function exampleEncodeDecode() {
  const query = mailhog.encode('üäö', 'quoted-printable')
  console.log(query) // =C3=BC=C3=A4=C3=B6
  const output = mailhog.decode('5pel5pys', 'base64')
  console.log(output) // 日本
}

async function exampleEncodedSearch() {
  const query = mailhog.encode('üäö', 'quoted-printable')
  // Search for "üäö" in quoted-printable encoding:
  const result = await mailhog.search(query)
  console.log('Encoded search total: ', result.total)
}

// ---- run them in order, capturing what each logs -------------------------------------------

async function main() {
  const examples = {
    messages: exampleMessages,
    search: exampleSearch,
    latestFrom: exampleLatestFrom,
    latestTo: exampleLatestTo,
    latestContaining: exampleLatestContaining,
    encodeDecode: exampleEncodeDecode,
    encodedSearch: exampleEncodedSearch,
    release: exampleRelease,
    deleteMessage: exampleDeleteMessage,
    deleteAll: exampleDeleteAll
  }
  const output = {}
  for (const [name, example] of Object.entries(examples)) {
    lines.length = 0
    await example()
    output[name] = lines.slice()
  }
  process.stdout.write(JSON.stringify(output) + '\n')
}

main().catch(error => {
  process.stderr.write(String(error && error.stack) + '\n')
  process.exit(1)
})
