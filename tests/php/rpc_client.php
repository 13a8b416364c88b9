<?php
/**
 * A dependency-free Goridge RPC client (php-cli only, no composer), speaking the frames
 * spiral/goridge's Spiral\Goridge\RPC\RPC sends with its JSON codec: a request frame with
 * flags CODEC_JSON and two options [sequence id, method name length], payload = method name
 * then the JSON argument; the answer carries the same sequence id and method name, and an
 * error answer has the ERROR flag (spiral/goridge throws it as a ServiceException, this
 * client as a RuntimeException with the same "Error '<text>' on <address>" wording).
 */

declare(strict_types=1);

final class GoridgeRPC
{
    private const CODEC_JSON = 0x08;
    private const ERROR = 0x40;

    /** @var resource */
    private $socket;
    private int $seq = 1;

    public function __construct(private string $address)
    {
        $socket = stream_socket_client($address, $code, $message, 5.0); // tcp:// and unix://
        if ($socket === false) {
            throw new RuntimeException("cannot connect to $address: $message");
        }
        stream_set_timeout($socket, 30);
        $this->socket = $socket;
    }

    public function call(string $method, mixed $payload): mixed
    {
        $body = json_encode($payload, JSON_THROW_ON_ERROR);
        $this->write(self::frame(self::CODEC_JSON, $method . $body, [$this->seq, strlen($method)]));
        $answer = $this->read();
        if (count($answer['options']) !== 2 || $answer['options'][0] !== $this->seq) {
            throw new RuntimeException('RPC answer out of sequence: ' . json_encode($answer['options']));
        }
        $this->seq++;
        $result = (string) substr($answer['payload'], $answer['options'][1]);
        if ($answer['flags'] & self::ERROR) {
            throw new RuntimeException(sprintf("Error '%s' on %s", $result, $this->address));
        }
        return json_decode($result, true, 512, JSON_THROW_ON_ERROR);
    }

    private static function frame(int $flags, string $payload, array $options): string
    {
        $head = pack('CCV', (1 << 4) | (3 + count($options)), $flags, strlen($payload));
        return $head . pack('VCC', crc32($head), 0, 0) . pack('V*', ...$options) . $payload;
    }

    private function write(string $bytes): void
    {
        while ($bytes !== '') {
            $written = fwrite($this->socket, $bytes);
            if ($written === false || $written === 0) {
                throw new RuntimeException('RPC connection closed while sending');
            }
            $bytes = (string) substr($bytes, $written);
        }
    }

    private function readExactly(int $size): string
    {
        $data = '';
        while (strlen($data) < $size) {
            $chunk = fread($this->socket, $size - strlen($data));
            if ($chunk === false || $chunk === '') {
                throw new RuntimeException('RPC connection closed while reading');
            }
            $data .= $chunk;
        }
        return $data;
    }

    /** @return array{flags:int, options:list<int>, payload:string} */
    private function read(): array
    {
        $h = unpack('Cb0/Cflags/Vlength/Vcrc/Cbyte10/Cbyte11', $this->readExactly(12));
        $count = ($h['b0'] & 0x0F) - 3;
        $options = $count > 0 ? array_values(unpack('V*', $this->readExactly(4 * $count))) : [];
        $payload = $h['length'] > 0 ? $this->readExactly($h['length']) : '';
        return ['flags' => $h['flags'], 'options' => $options, 'payload' => $payload];
    }
}
