// amqplib closing a connection with publishes still queued behind its connection.close.
//
// Usage: node close_with_pending.js AMQP_URL [MESSAGES]
//
// Connects, opens a channel, publishes MESSAGES (default 5000) 1 KiB messages without waiting,
// then calls connection.close(). Exits 0 only if close() resolves within 3 s and neither the
// connection nor its socket reported an error (EPIPE, ECONNRESET, ...) before that.
// A broker that closes the TCP socket right after close-ok makes the client's remaining writes
// fail (EPIPE), and amqplib then loses its close callback until a 10 s timeout.
//
// A socket error *after* close() resolved is printed as a `note:` line, not a failure: RabbitMQ
// closes its end with a reset once the client has closed its own (SO_LINGER 0), which clients
// never see as an error.
'use strict';

const amqp = require('amqplib');

const url = process.argv[2];
const messages = Number.parseInt(process.argv[3] || '5000', 10);
if (!url) {
  console.error('usage: node close_with_pending.js AMQP_URL [MESSAGES]');
  process.exit(64);
}

const errors = [];
let closed = false;
const late = [];

function fail(code, msg) {
  console.error(msg);
  process.exit(code);
}

async function main() {
  const conn = await amqp.connect(url);
  conn.on('error', (e) => errors.push(`connection error: ${e.code || ''} ${e.message}`));
  const stream = conn.connection.stream;
  stream.on('error', (e) => (closed ? late : errors).push(`socket error: ${e.code || ''} ${e.message}`));
  const ch = await conn.createChannel();
  ch.on('error', (e) => errors.push(`channel error: ${e.message}`));
  const q = await ch.assertQueue('', { exclusive: true });
  const body = Buffer.alloc(1024, 'x');
  for (let i = 0; i < messages; i++) {
    ch.sendToQueue(q.queue, body);
  }
  const started = Date.now();
  const timer = setTimeout(
    () => fail(2, `connection.close() did not resolve within 3 s; errors: ${errors.join('; ') || 'none'}`),
    3000,
  );
  await conn.close();
  closed = true;
  clearTimeout(timer);
  const took = Date.now() - started;
  if (errors.length > 0) {
    fail(1, `closed in ${took} ms but with errors: ${errors.join('; ')}`);
  }
  // How the broker ends the TCP connection shows a little later.
  await new Promise((resolve) => setTimeout(resolve, 300));
  for (const e of late) {
    console.log(`note: after close resolved: ${e}`);
  }
  console.log(`closed cleanly in ${took} ms with ${messages} publishes pending`);
}

main().catch((e) => fail(1, `FAILED: ${e.stack || e}; errors: ${errors.join('; ') || 'none'}`));
