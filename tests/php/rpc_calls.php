<?php
/**
 * Calls mailpipe's RPC endpoint as RoadRunner's PHP tooling does, over one connection, and
 * prints what came back as one JSON document (for tests/test_rpc.py):
 *
 *     php tests/php/rpc_calls.php tcp://127.0.0.1:6001 smtp.WorkersList true informer.Workers '"smtp"' ...
 *
 * Arguments after the address go in pairs: a method and its JSON argument. Each result is
 * {"method", "result"} or {"method", "error"} (the exception's message).
 */

declare(strict_types=1);

require __DIR__ . '/rpc_client.php';

$address = $argv[1] ?? getenv('RR_RPC') ?: 'tcp://127.0.0.1:6001';
$rpc = new GoridgeRPC($address);
$out = [];
for ($i = 2; $i + 1 < count($argv); $i += 2) {
    $method = $argv[$i];
    try {
        $out[] = ['method' => $method, 'result' => $rpc->call($method, json_decode($argv[$i + 1], true))];
    } catch (RuntimeException $e) {
        $out[] = ['method' => $method, 'error' => $e->getMessage()];
    }
}
echo json_encode($out, JSON_UNESCAPED_SLASHES), "\n";
