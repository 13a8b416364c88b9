<?php
/**
 * A dependency-free mailpipe worker: php-cli only, no composer.
 *
 * It speaks RoadRunner's worker protocol directly (Goridge v3 frames over STDIN/STDOUT,
 * see docs/protocols.md sections 1 and 2; the frames are in goridge.php beside it), so
 * it shows the whole protocol in two short pages.
 * For real projects prefer spiral/roadrunner-worker (see ../worker.php); both run unchanged
 * under mailpipe:
 *
 *     server:
 *       command: "php examples/php/goridge_worker.php"
 *
 * Per email: the context is the EMAIL_RECEIVED event JSON, the body the raw message (empty
 * unless include_raw is on). It answers CONTINUE, or CLOSE when the subject contains "[close]".
 *
 * Test hooks, driven by the subject or the environment:
 *   [error]       answer with an error frame (mailpipe logs it and still answers 250)
 *   [close]       answer CLOSE
 *   [sleep N]     sleep N seconds before answering
 *   [crash]       exit(1) without answering
 *   [print]       echo garbage (redirected to stderr, as spiral/roadrunner-worker does)
 *   [stop]        worker-initiated stop (the email goes to another worker)
 *   MAILPIPE_TEST_LOG=/path     append one JSON line per answered email: pid, uuid, subject, answer
 *   MAILPIPE_TEST_SLEEP_MS=N    sleep N ms on every email
 */

declare(strict_types=1);

require __DIR__ . '/goridge.php';

function record(array $event, string $subject, string $answer): void
{
    test_log(['uuid' => $event['uuid'] ?? '', 'subject' => $subject, 'answer' => $answer]);
}

while (($request = next_request()) !== null) {
    $event = json_decode($request[0], true);
    if (!is_array($event)) {
        respond_error('bad request: the context is not an EMAIL_RECEIVED event');
        continue;
    }
    $subject = (string) ($event['message']['subject'] ?? '');
    fwrite(STDERR, sprintf(
        "[php worker %d] %s from %s to %s\n",
        getmypid(),
        json_encode($subject, JSON_UNESCAPED_UNICODE),
        $event['envelope']['from'] ?? '',
        implode(', ', $event['envelope']['to'] ?? [])
    ));

    test_delay_or_crash($subject);
    if (str_contains($subject, '[print]')) {
        echo "garbage that must not reach the frame channel\n";
    }
    if (str_contains($subject, '[stop]')) {
        respond('{"stop":true}'); // worker-initiated stop: exactly this context, empty body
        exit(0);
    }
    if (str_contains($subject, '[error]')) {
        record($event, $subject, 'error');
        respond_error('refused: ' . $subject);
    } elseif (str_contains($subject, '[close]')) {
        record($event, $subject, 'CLOSE');
        respond('CLOSE');
    } else {
        record($event, $subject, 'CONTINUE');
        respond('CONTINUE');
    }
}
