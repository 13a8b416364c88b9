// Prints, as one JSON line, what the npm `mailhog` client reads of the latest message to
// process.argv[2]: its decoded headers, text, HTML and attachments (their bytes in base64).
'use strict'

const mailhog = require('mailhog')({
  host: '127.0.0.1',
  port: Number(process.env.MAILHOG_PORT),
  basePath: process.env.MAILHOG_BASE_PATH
})

async function main() {
  const mail = await mailhog.latestTo(process.argv[2])
  if (!mail) throw new Error(`no message to ${process.argv[2]}`)
  const attachments = mail.attachments.map(file => ({
    name: file.name,
    type: file.type,
    encoding: file.encoding,
    base64: Buffer.from(mailhog.decode(file.Body, file.encoding, 'latin1'), 'latin1').toString('base64')
  }))
  const seen = {
    ID: mail.ID,
    subject: mail.subject,
    from: mail.from,
    to: mail.to,
    cc: mail.cc,
    text: mail.text,
    html: mail.html,
    attachments
  }
  process.stdout.write(JSON.stringify(seen) + '\n')
}

main().catch(error => {
  process.stderr.write(String(error && error.stack) + '\n')
  process.exit(1)
})
