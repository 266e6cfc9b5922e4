// The worker's side of a warm start's identity agent (guest-identity.ts runOverAgent): what it sends,
// and what it accepts of what a guest, maybe hostile, answers. The agent in a real guest is covered by
// qemu-warm-start.test.ts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { duplexPair } from 'node:stream';
import { DROPBEAR_RESTARTED, runOverAgent } from '../src/worker/drivers/guest-identity.ts';

/** A fake guest on the other end: `answer` gets what the worker sent, once it has sent the end line. */
function guest(answer: (script: string, reply: (s: string) => void) => void) {
  const [worker, agent] = duplexPair();
  let got = '';
  agent.on('data', (d: Buffer) => {
    got += d.toString();
    if (got.endsWith('\norchard-identity-end\n')) answer(got.slice(0, -'orchard-identity-end\n'.length), (s) => agent.write(s));
  });
  return { worker, agent };
}

test('runOverAgent: sends the script and the end line; resolves with the output before the exit line, lines seen as they come', async () => {
  const seen: string[] = [];
  const { worker } = guest((script, reply) => {
    assert.equal(script, 'echo hi\n\n');
    reply(`${DROPBEAR_RESTARTED}\r\nname\nm`);
    reply('ac\norchard-identity-exit 0\nlater\n');
  });
  assert.equal(await runOverAgent(worker, 'echo hi\n', { onLine: (l) => seen.push(l) }), `${DROPBEAR_RESTARTED}\nname\nmac\n`);
  assert.deepEqual(seen, [DROPBEAR_RESTARTED, 'name', 'mac']);
  assert.ok(worker.destroyed, 'the socket is closed once the script has run');
});

test('runOverAgent: a non-zero exit, an agent that closes, more output than a script makes, or silence: rejected, saying which', async () => {
  await assert.rejects(runOverAgent(guest((_, reply) => reply('set: boom\norchard-identity-exit 2\n')).worker, 'x'), /exit code 2: set: boom/);
  const closing = guest(() => closing.agent.end());
  await assert.rejects(runOverAgent(closing.worker, 'x'), /closed/);
  await assert.rejects(runOverAgent(guest((_, reply) => reply('y'.repeat(70_000))).worker, 'x'), /more than an identity script/);
  await assert.rejects(runOverAgent(guest(() => {}).worker, 'x', { timeoutMs: 50 }), /did not answer within 0.05 s/);
  // an exit line that is not a number is not a success
  await assert.rejects(runOverAgent(guest((_, reply) => reply('orchard-identity-exit 0x\n')).worker, 'x'), /exit code NaN/);
});
