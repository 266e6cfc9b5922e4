// The `$6$` password hash a warm-started guest's /etc/shadow gets is made on the worker: it must be
// what the guest's crypt(3) computes (the spec's test vectors; a login with the password is checked
// on a real guest in qemu-warm-start.test.ts).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { newSalt, sha512Crypt } from '../src/worker/drivers/sha512-crypt.ts';

test('sha512Crypt: the test vectors of "Unix crypt using SHA-256 and SHA-512" (default rounds); salts are 16 characters of the crypt alphabet, new each time', () => {
  assert.equal(sha512Crypt('Hello world!', 'saltstring'),
    '$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1');
  // a salt is cut at 16 characters
  assert.equal(sha512Crypt('This is just a test', 'toolongsaltstringXX').split('$')[2], 'toolongsaltstrin');
  // busybox mkpasswd -m sha512 -S abcdefgh12345678 admin (the guest's own tool)
  assert.equal(sha512Crypt('admin', 'abcdefgh12345678'),
    '$6$abcdefgh12345678$YfS4V1ViTpDhDlxpKCsrZ2xLDPNyZAfza.rpsZHpt9JSckT6EU6qMLmlUqkQ.mqKDfHQkUMWbetrTkvhE0r7k/');
  assert.match(newSalt(), /^[./0-9A-Za-z]{16}$/);
  assert.notEqual(newSalt(), newSalt());
  assert.match(sha512Crypt('admin'), /^\$6\$[./0-9A-Za-z]{16}\$[./0-9A-Za-z]{86}$/);
});
