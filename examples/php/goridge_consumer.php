<?php
/**
 * A dependency-free mailpipe jobs consumer: php-cli only, no composer.
 *
 * It speaks RoadRunner's worker protocol and its jobs response protocol directly (Goridge v3
 * frames over STDIN/STDOUT, see shared/spec/protocols.md sections 1, 2 and 3.3-3.4), so it shows
 * the whole protocol in one page. For real projects prefer spiral/roadrunner-jobs (see
 * ../consumer.php); both run unchanged under mailpipe:
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

const CONTROL = 0x01;
const ERROR = 0x40;
const BYTE10_STOP = 0x02;
const BYTE10_PONG = 0x08;

// The jobs response types (protocols.md 3.4).
const TYPE_SUCCESS = 0;
const TYPE_ERROR = 1;
const TYPE_NACK = 3;

// Nothing but frames may reach STDOUT: echo, print and PHP's own warnings go to STDERR.
ini_set('display_errors', 'stderr');
ob_start(static function (string $chunk): string {
    fwrite(STDERR, $chunk);
    return '';
}, 1);

function pack_frame(int $flags, string $payload, array $options = []): string
{
    $head = pack('CCV', (1 << 4) | (3 + count($options)), $flags, strlen($payload));
    $frame = $head . pack('VCC', crc32($head), 0, 0);
    if ($options) {
        $frame .= pack('V*', ...$options);
    }
    return $frame . $payload;
}

function send(string $bytes): void
{
    while ($bytes !== '') {
        $written = fwrite(STDOUT, $bytes);
        if ($written === false || $written === 0) {
            exit(1); // mailpipe went away
        }
        $bytes = (string) substr($bytes, $written);
    }
    fflush(STDOUT);
}

function read_exactly(int $size): ?string
{
    $data = '';
    while (strlen($data) < $size) {
        $chunk = fread(STDIN, $size - strlen($data));
        if ($chunk === false || $chunk === '') {
            if (feof(STDIN)) {
                return $data === '' ? null : throw new RuntimeException('truncated frame');
            }
            continue;
        }
        $data .= $chunk;
    }
    return $data;
}

/** @return array{flags:int, byte10:int, options:list<int>, payload:string}|null */
function read_frame(): ?array
{
    $header = read_exactly(12);
    if ($header === null) {
        return null;
    }
    $h = unpack('Cb0/Cflags/Vlength/Vcrc/Cbyte10/Cbyte11', $header);
    if (crc32(substr($header, 0, 6)) !== $h['crc'] || ($h['b0'] >> 4) !== 1) {
        throw new RuntimeException('bad frame header: ' . bin2hex($header));
    }
    $count = ($h['b0'] & 0x0F) - 3;
    $options = $count > 0 ? array_values(unpack('V*', read_exactly(4 * $count) ?? '')) : [];
    $payload = $h['length'] > 0 ? (read_exactly($h['length']) ?? '') : '';
    return ['flags' => $h['flags'], 'byte10' => $h['byte10'], 'options' => $options, 'payload' => $payload];
}

/** The jobs answer: JSON in the body, empty context (one option = 0), flags 0. */
function answer(int $type, array $data = []): void
{
    send(pack_frame(0, json_encode(['type' => $type, 'data' => $data]), [0]));
}

function record(string $id, string $subject, string $answer): void
{
    $log = getenv('MAILPIPE_TEST_LOG');
    if ($log) {
        $line = json_encode(
            ['pid' => getmypid(), 'id' => $id, 'subject' => $subject, 'answer' => $answer],
            JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE
        );
        file_put_contents($log, $line . "\n", FILE_APPEND | LOCK_EX);
    }
}

$sleepMs = (int) (getenv('MAILPIPE_TEST_SLEEP_MS') ?: 0);

while (($frame = read_frame()) !== null) {
    if ($frame['flags'] & CONTROL) {
        $command = json_decode($frame['payload'], true);
        if (!empty($command['stop'])) {
            exit(0);
        }
        if (!empty($command['pid'])) {
            send(pack_frame(CONTROL, json_encode(['pid' => getmypid()])));
        }
        continue;
    }
    if ($frame['byte10'] & (BYTE10_STOP | BYTE10_PONG)) {
        continue; // no stream in progress between requests
    }

    $length = $frame['options'][0] ?? 0;
    $job = json_decode(substr($frame['payload'], 0, $length), true);
    if (!is_array($job)) {
        send(pack_frame(ERROR, 'bad request: the context is not a job'));
        continue;
    }
    $id = (string) ($job['id'] ?? '');
    $headers = (array) ($job['headers'] ?? []);
    $event = json_decode((string) substr($frame['payload'], $length), true);
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

    if ($sleepMs > 0) {
        usleep($sleepMs * 1000);
    }
    if (preg_match('/\[sleep ([0-9.]+)\]/', $subject, $m)) {
        usleep((int) ((float) $m[1] * 1e6));
    }
    if (str_contains($subject, '[crash]')) {
        exit(1);
    }

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
