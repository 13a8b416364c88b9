<?php
/**
 * A mailpipe jobs consumer written against spiral/roadrunner-jobs, exactly as for RoadRunner.
 *
 * Install the RoadRunner jobs library in your project:
 *
 *     composer require spiral/roadrunner-jobs:^4.0
 *
 * and point mailpipe's jobs pool at this script (mailpipe.yaml, or your existing .rr.yaml):
 *
 *     smtp:
 *       jobs:
 *         pipeline: emails
 *     jobs:
 *       pipelines:
 *         emails:
 *           driver: redis              # or sqlite, amqp, nats (memory: development only)
 *       consume: [emails]            # or run `mailpipe jobs consume emails` elsewhere
 *       pool:
 *         command: "php consumer.php"
 *         num_workers: 4
 *
 * Each email is one job: name "smtp.email", id = the email's uuid, payload = the
 * EMAIL_RECEIVED event JSON, headers "uuid" plus smtp.jobs.headers. The SMTP client got its 250
 * when the broker confirmed the job; this code runs later, maybe twice (at least once
 * delivery), so make it idempotent with the job id.
 *
 * complete() acks; fail($error, requeue: true) puts the job back (withDelay(N) first to wait N
 * seconds); fail($error) without requeue dead-letters it. mailpipe dead-letters a job after the
 * pipeline's max_attempts deliveries. spiral/roadrunner-jobs 4.5+ also has ack(), nack() and
 * requeue(), which mailpipe understands as well (they are deprecating complete()/fail()).
 *
 * echo/print output goes to stderr (the Worker that Consumer creates intercepts it), which
 * mailpipe logs.
 */

declare(strict_types=1);

use Spiral\RoadRunner\Jobs\Consumer;

require __DIR__ . '/vendor/autoload.php';

$consumer = new Consumer();

while ($task = $consumer->waitTask()) {
    try {
        $event = json_decode($task->getPayload(), true, 512, JSON_THROW_ON_ERROR);
        $subject = $event['message']['subject'] ?? '';

        error_log(sprintf(
            'job %s (%s on %s): "%s" from %s to %s',
            $task->getId(),
            $task->getName(),
            $task->getPipeline(),
            $subject,
            $event['envelope']['from'],
            implode(', ', $event['envelope']['to'])
        ));

        // ... your work here, keyed by $task->getId() (= $event['uuid']) to be idempotent ...

        $task->complete();
    } catch (\Throwable $e) {
        // Back in the queue in 10 seconds; dead-lettered after max_attempts.
        $task->withDelay(10)->fail($e, true);
    }
}
