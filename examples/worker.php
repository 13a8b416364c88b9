<?php
/**
 * A mailpipe worker written against spiral/roadrunner-worker, exactly as for RoadRunner.
 *
 * Install the RoadRunner worker library in your project:
 *
 *     composer require spiral/roadrunner-worker
 *
 * and point mailpipe at this script (mailpipe.yaml, or your existing .rr.yaml):
 *
 *     server:
 *       command: "php worker.php"
 *       relay: pipes            # or tcp://127.0.0.1:7000, unix:///tmp/mailpipe.sock
 *     smtp:
 *       pool:
 *         num_workers: 4
 *
 * Each captured email arrives as one payload: the header (RoadRunner's "context") holds the
 * EMAIL_RECEIVED event JSON, the body holds the raw message (empty unless include_raw is on).
 * Answer with the word CONTINUE (the SMTP session stays open) or CLOSE (mailpipe sends 250, then
 * closes the session) in the response HEADER. Note the argument order of RoadRunner's
 * Payload: new Payload($body, $header).
 *
 * echo/print output goes to stderr (Worker::create() intercepts it), which mailpipe logs.
 */

declare(strict_types=1);

use Spiral\RoadRunner\Payload;
use Spiral\RoadRunner\Worker;

require __DIR__ . '/vendor/autoload.php';

$worker = Worker::create();

while ($payload = $worker->waitPayload()) {
    try {
        $event = json_decode($payload->header, true, 512, JSON_THROW_ON_ERROR);
        $subject = $event['message']['subject'] ?? '';

        error_log(sprintf(
            'email %s: "%s" from %s to %s',
            $event['uuid'],
            $subject,
            $event['envelope']['from'],
            implode(', ', $event['envelope']['to'])
        ));

        $answer = str_contains($subject, '[close]') ? 'CLOSE' : 'CONTINUE';
        $worker->respond(new Payload('', $answer)); // body '', header = CONTINUE/CLOSE
    } catch (\Throwable $e) {
        $worker->error((string) $e); // logged by mailpipe; the client still gets 250
    }
}
