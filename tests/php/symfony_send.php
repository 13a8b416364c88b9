<?php
// Sends one email through mailpipe with Debian's php-symfony-mailer.
// Input: a JSON object on stdin (see tests/test_clients.py); output: a JSON object on stdout.
declare(strict_types=1);

require_once '/usr/share/php/Symfony/Component/Mailer/autoload.php';

use Symfony\Component\Mailer\Envelope;
use Symfony\Component\Mailer\Transport\Smtp\EsmtpTransport;
use Symfony\Component\Mime\Address;
use Symfony\Component\Mime\Email;

$in = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);

$transport = new EsmtpTransport('127.0.0.1', (int) $in['port'], false);
$transport->setLocalDomain($in['helo']);
if (isset($in['user'])) {
    $transport->setUsername($in['user']);
    $transport->setPassword($in['password']);
}

$email = (new Email())
    ->from(new Address($in['from'], $in['from_name']))
    ->to(...$in['to'])
    ->cc(...$in['cc'])
    ->bcc(...$in['bcc'])
    ->subject($in['subject'])
    ->text($in['text'])
    ->html($in['html']);
foreach ($in['attachments'] as $a) {
    $email->attachFromPath($a['path'], $a['name'], $a['content_type']);
}

$sent = $transport->send($email);
echo json_encode([
    'message_id' => $sent->getMessageId(),
    'envelope_from' => $sent->getEnvelope()->getSender()->getAddress(),
    'envelope_to' => array_map(fn (Address $r) => $r->getAddress(), $sent->getEnvelope()->getRecipients()),
    'debug' => $sent->getDebug(),
], JSON_THROW_ON_ERROR | JSON_UNESCAPED_UNICODE), "\n";
