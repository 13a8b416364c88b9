<?php
/**
 * A dependency-free mailpipe jobs consumer: php-cli only, no composer.
 *
 * It speaks RoadRunner's worker protocol and its jobs response protocol directly (Goridge v3
 * frames over STDIN/STDOUT, see docs/protocols.md sections 1, 2 and 3.3-3.4; the frames
 * are in goridge.php beside it), so it shows the whole protocol in two short pages. For real
 * projects prefer spiral/roadrunner-jobs (see ../consumer.php); both run unchanged under
 * mailpipe:
 *
 *     jobs:
 *       pool:
 *         command: "php examples/php/goridge_consumer.php"
 *
 * Per job: the request's context is the job's metadata JSON
 * {"id","job","driver","queue","headers","pipeline"}, its body the job payload (the
 * EMAIL_RECEIVED event JSON). The answer goes in the response BODY, with an empty context:
 * {"type":0,"data":[]} as spiral/roadrunner-jobs' complete() sends it, or
 * {"type":3,"data":{"message":…,"requeue":…,"delay_seconds":N}} (nack).
 *
 * Test hooks, driven by the subject or the environment:
 *   [fail]        nack with requeue (the job comes back; dead after max_attempts)
 *   [dead]        nack without requeue (dead-lettered at once)
 *   [error]       fail with requeue, as complete()'s sibling fail($e, true): type 1 with headers
 *   [sleep N]     sleep N seconds before answering
 *   [crash]       exit(1) without answering (the job comes back)
 *   MAILPIPE_TEST_LOG=/path     append one JSON line per job: pid, id, subject, answer
 *   MAILPIPE_TEST_SLEEP_MS=N    sleep N ms on every job
 */

declare(strict_types=1);

require __DIR__ . '/goridge.php';

// The jobs response types (protocols.md 3.4).
const TYPE_SUCCESS = 0;
const TYPE_ERROR = 1;
const TYPE_NACK = 3;

/** The jobs answer: JSON in the body, empty context (one option = 0), flags 0. */
function answer(int $type, array $data = []): void
{
    respond('', json_encode(['type' => $type, 'data' => $data]));
}

function record(string $id, string $subject, string $answer): void
{
    test_log(['id' => $id, 'subject' => $subject, 'answer' => $answer]);
}

while (($request = next_request()) !== null) {
    $job = json_decode($request[0], true);
    if (!is_array($job)) {
        respond_error('bad request: the context is not a job');
        continue;
    }
    $id = (string) ($job['id'] ?? '');
    $headers = (array) ($job['headers'] ?? []);
    $event = json_decode($request[1], true);
    if (!is_array($event)) {
        record($id, '', 'nack');
        answer(TYPE_NACK, ['message' => 'the payload is not an EMAIL_RECEIVED event', 'requeue' => false, 'delay_seconds' => 0]);
        continue;
    }
    $subject = (string) ($event['message']['subject'] ?? '');
    fwrite(STDERR, sprintf(
        "[php consumer %d] job %s (%s on %s): %s from %s to %s\n",
        getmypid(),
        $id,
        $job['job'] ?? '',
        $job['pipeline'] ?? '',
        json_encode($subject, JSON_UNESCAPED_UNICODE),
        $event['envelope']['from'] ?? '',
        implode(', ', $event['envelope']['to'] ?? [])
    ));

    test_delay_or_crash($subject);

    if (str_contains($subject, '[fail]')) {
        record($id, $subject, 'nack-requeue');
        answer(TYPE_NACK, ['message' => 'refused: ' . $subject, 'requeue' => true, 'delay_seconds' => 0]);
    } elseif (str_contains($subject, '[dead]')) {
        record($id, $subject, 'nack');
        answer(TYPE_NACK, ['message' => 'refused for good: ' . $subject, 'requeue' => false, 'delay_seconds' => 0]);
    } elseif (str_contains($subject, '[error]')) {
        record($id, $subject, 'fail');
        $data = ['message' => 'refused: ' . $subject, 'requeue' => true, 'delay_seconds' => 0];
        if ($headers) {
            $data['headers'] = $headers;
        }
        answer(TYPE_ERROR, $data);
    } else {
        record($id, $subject, 'ack');
        answer(TYPE_SUCCESS); // {"type":0,"data":[]}, as complete()
    }
}
