<?php
/**
 * Goridge v3 frames over STDIN/STDOUT for the dependency-free examples (php-cli only, no
 * composer): goridge_worker.php and goridge_consumer.php require it.
 *
 * RoadRunner's worker protocol, docs/protocols.md sections 1 and 2: a 12-byte header
 * (version 1 and header size in words, flags, payload length, CRC32 of the first 6 bytes,
 * byte10 for streams), the options (uint32 LE; a request's first is its context length),
 * then the payload. Requiring this file also keeps STDOUT for frames alone.
 *
 * It also holds the test hooks both examples share (see their headers).
 */

declare(strict_types=1);

const CONTROL = 0x01;
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

/**
 * The next request as [context, body], or null once mailpipe closes STDIN. Control frames on
 * the way are handled here: a pid request is answered, a stop request exits.
 *
 * @return array{0:string, 1:string}|null
 */
function next_request(): ?array
{
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
        return [(string) substr($frame['payload'], 0, $length), (string) substr($frame['payload'], $length)];
    }
    return null;
}

/** A response: flags 0, the context length as its one option, then context and body. */
function respond(string $context, string $body = ''): void
{
    send(pack_frame(0, $context . $body, [strlen($context)]));
}

/** An error response: mailpipe logs the message. */
function respond_error(string $message): void
{
    send(pack_frame(ERROR, $message));
}

// ---- test hooks ------------------------------------------------------------------------------

/** MAILPIPE_TEST_SLEEP_MS=N and "[sleep N]" in the subject delay the answer; "[crash]" exits. */
function test_delay_or_crash(string $subject): void
{
    $sleepMs = (int) (getenv('MAILPIPE_TEST_SLEEP_MS') ?: 0);
    if ($sleepMs > 0) {
        usleep($sleepMs * 1000);
    }
    if (preg_match('/\[sleep ([0-9.]+)\]/', $subject, $m)) {
        usleep((int) ((float) $m[1] * 1e6));
    }
    if (str_contains($subject, '[crash]')) {
        exit(1);
    }
}

/** MAILPIPE_TEST_LOG=/path: append one JSON line, this process's pid first. */
function test_log(array $fields): void
{
    $log = getenv('MAILPIPE_TEST_LOG');
    if ($log) {
        $line = json_encode(['pid' => getmypid()] + $fields, JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE);
        file_put_contents($log, $line . "\n", FILE_APPEND | LOCK_EX);
    }
}
