<?php
// Sends emails through mailpipe with Debian's libphp-phpmailer, all over one SMTP connection
// (SMTPKeepAlive). Input: a JSON object on stdin (see tests/test_clients.py); output: JSON.
declare(strict_types=1);

require_once '/usr/share/php/libphp-phpmailer/autoload.php';

use PHPMailer\PHPMailer\PHPMailer;

$in = json_decode(stream_get_contents(STDIN), true, 512, JSON_THROW_ON_ERROR);

$mail = new PHPMailer(true);
$mail->isSMTP();
$mail->Host = '127.0.0.1';
$mail->Port = (int) $in['port'];
$mail->SMTPSecure = '';
$mail->SMTPAutoTLS = false;
$mail->SMTPKeepAlive = true;
$mail->Helo = $in['helo'];
$mail->CharSet = PHPMailer::CHARSET_UTF8;
if (isset($in['user'])) {
    $mail->SMTPAuth = true;
    $mail->AuthType = $in['auth_type'];
    $mail->Username = $in['user'];
    $mail->Password = $in['password'];
}

$ids = [];
foreach ($in['messages'] as $m) {
    $mail->clearAllRecipients();
    $mail->clearAttachments();
    $mail->setFrom($m['from'], $m['from_name']);
    $mail->Sender = $m['from']; // setFrom fills Sender only once: the envelope sender
    foreach ($m['to'] as $to) {
        $mail->addAddress($to);
    }
    foreach ($m['cc'] as $cc) {
        $mail->addCC($cc);
    }
    foreach ($m['bcc'] as $bcc) {
        $mail->addBCC($bcc);
    }
    $mail->Subject = $m['subject'];
    $mail->isHTML(true);
    $mail->Body = $m['html'];
    $mail->AltBody = $m['text'];
    foreach ($m['attachments'] as $a) {
        $mail->addAttachment($a['path'], $a['name'], PHPMailer::ENCODING_BASE64, $a['content_type']);
    }
    $mail->send();
    $ids[] = $mail->getLastMessageID();
}
$mail->smtpClose();
echo json_encode(['message_ids' => $ids], JSON_THROW_ON_ERROR | JSON_UNESCAPED_UNICODE), "\n";
