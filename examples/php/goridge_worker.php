<?php
/**
 * A dependency-free mailpipe worker: php-cli only, no composer.
 *
 * It speaks RoadRunner's worker protocol directly (Goridge v3 frames over STDIN/STDOUT,
 * see shared/spec/protocols.md sections 1 and 2), so it shows the whole protocol in one page.
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

const CONTROL = 0x01;
const CODEC_JSON = 0x08;
const ERROR = 0x40;
const BYTE10_STOP = 0x02;
const BYTE10_PONG = 0x08;

// Nothing but frames may reach STDOUT: echo, print and PHP's own warnings go to STDERR.
ini_set('display_errors', 'stderr');
ob_start(static function (string $chunk): string {
    fwrite(STDERR, $chunk);
    return '';
}, 1);

function pack_frame(int $flags, string $payload, array $options = [], int $byte10 = 0): string
{
    $head = pack('CCV', (1 << 4) | (3 + count($options)), $flags, strlen($payload));
    $frame = $head . pack('VCC', crc32($head), $byte10, 0);
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

function respond(string $context, string $body = ''): void
{
    send(pack_frame(0, $context . $body, [strlen($context)]));
}

function record(array $event, string $subject, string $answer): void
{
    $log = getenv('MAILPIPE_TEST_LOG');
    if ($log) {
        $line = json_encode(
            ['pid' => getmypid(), 'uuid' => $event['uuid'] ?? '', 'subject' => $subject, 'answer' => $answer],
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
    $event = json_decode(substr($frame['payload'], 0, $length), true);
    $raw = (string) substr($frame['payload'], $length);
    if (!is_array($event)) {
        send(pack_frame(ERROR, 'bad request: the context is not an EMAIL_RECEIVED event'));
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

    if ($sleepMs > 0) {
        usleep($sleepMs * 1000);
    }
    if (preg_match('/\[sleep ([0-9.]+)\]/', $subject, $m)) {
        usleep((int) ((float) $m[1] * 1e6));
    }
    if (str_contains($subject, '[crash]')) {
        exit(1);
    }
    if (str_contains($subject, '[print]')) {
        echo "garbage that must not reach the frame channel\n";
    }
    if (str_contains($subject, '[stop]')) {
        respond('{"stop":true}'); // worker-initiated stop: exactly this context, empty body
        exit(0);
    }
    if (str_contains($subject, '[error]')) {
        record($event, $subject, 'error');
        send(pack_frame(ERROR, 'refused: ' . $subject));
    } elseif (str_contains($subject, '[close]')) {
        record($event, $subject, 'CLOSE');
        respond('CLOSE');
    } else {
        record($event, $subject, 'CONTINUE');
        respond('CONTINUE');
    }
}
