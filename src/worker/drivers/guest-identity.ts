// A warm-started guest's own identity. A VM resumed from an image's snapshot (snapshots.ts) wakes up
// as the template it was saved from: the template's hostname, SSH host keys, machine-id, MAC, clock,
// and the kernel's random state. Before the VM is reported running, the worker logs in with the
// image's SSH key and gives it its own (hostname = the VM's name, new host keys, a new machine-id, a
// new MAC, the host's time, the VM's user and password, as cloud-init does on a first boot).
//
// The host keys are made here, on the worker, not in the guest: the guest's random state is a copy
// of the template's until the kernel reseeds (QEMU's vmgenid device makes it reseed on resume, but a
// key made from host entropy does not depend on that), and under TCG dropbearkey takes 0.3 s for
// ed25519 and 5.2 s for a 2048-bit RSA key in a 1-vCPU guest. So the VM gets ed25519 and ECDSA
// P-256 keys in dropbear's format; the template's RSA key is removed, not replaced (an RSA key made
// on the worker costs 0.44 s of its CPU, and every SSH client since 2014 takes ed25519).
import { generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import type { Duplex } from 'node:stream';
import ssh2 from 'ssh2';
import { hostnameOf } from './cloud-init.ts';
import { sha512Crypt } from './sha512-crypt.ts';

/** One SSH host key: the private key as dropbear stores it, the public key as a known_hosts line. */
export interface HostKey {
  type: 'ed25519' | 'ecdsa';
  /** dropbear's private key file */
  dropbear: Buffer;
  /** `ssh-ed25519 AAAA…` (known_hosts without the host part) */
  publicLine: string;
}

const sshString = (b: Buffer | string) => {
  const buf = typeof b === 'string' ? Buffer.from(b) : b;
  const len = Buffer.alloc(4);
  len.writeUInt32BE(buf.length);
  return Buffer.concat([len, buf]);
};

/** An SSH mpint: big-endian, no leading zero bytes, one zero byte when the top bit is set. */
const sshMpint = (b: Buffer) => {
  let i = 0;
  while (i < b.length && b[i] === 0) i++;
  const v = b.subarray(i);
  return sshString(v.length && v[0] & 0x80 ? Buffer.concat([Buffer.alloc(1), v]) : v);
};

const b64url = (s: string | undefined) => Buffer.from(s ?? '', 'base64url');

/** New ed25519 and ECDSA P-256 host keys, from the worker's entropy. */
export function newHostKeys(): HostKey[] {
  const ed = generateKeyPairSync('ed25519').privateKey.export({ format: 'jwk' });
  const seed = b64url(ed.d);
  const pub = b64url(ed.x);
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  const point = Buffer.concat([Buffer.from([4]), b64url(ec.x), b64url(ec.y)]);
  const ecPublic = Buffer.concat([sshString('ecdsa-sha2-nistp256'), sshString('nistp256'), sshString(point)]);
  return [
    {
      type: 'ed25519',
      // dropbear's ed25519 key: the name, then a 64-byte string of the seed and the public key
      dropbear: Buffer.concat([sshString('ssh-ed25519'), sshString(Buffer.concat([seed, pub]))]),
      publicLine: `ssh-ed25519 ${Buffer.concat([sshString('ssh-ed25519'), sshString(pub)]).toString('base64')}`,
    },
    {
      type: 'ecdsa',
      // dropbear's ECDSA key: the public key blob, then the private scalar as an mpint
      dropbear: Buffer.concat([ecPublic, sshMpint(b64url(ec.d))]),
      publicLine: `ecdsa-sha2-nistp256 ${ecPublic.toString('base64')}`,
    },
  ];
}

/** A MAC address in QEMU's range (52:54:00:…) with three random bytes. */
export function newMac(): string {
  return ['52', '54', '00', ...[...randomBytes(3)].map((b) => b.toString(16).padStart(2, '0'))].join(':');
}

/** The line identityScript prints once the guest's dropbear listens with the new host keys. */
export const DROPBEAR_RESTARTED = 'orchard: dropbear restarted';

/** The line that ends a script sent to the agent, and the prefix of the line with its exit code. */
const AGENT_END = 'orchard-identity-end';
const AGENT_EXIT = 'orchard-identity-exit ';

/** The name of the virtio-serial port of the agent (QEMU's `agent.sock`). */
export const AGENT_PORT = 'org.orchard.agent';

/**
 * Started in the template before its state is saved (as root, over SSH), unless the image starts its
 * own at boot (images.ts BOOT_AGENT_ARG: debian-dev's /etc/orchard-agent, which takes one script
 * after another, in the same words, until the worker's side closes): a shell that waits on the
 * virtio-serial port AGENT_PORT for one script, runs it, prints its exit code and ends. A VM resumed
 * from the snapshot is given its identity through it, with no SSH login (under TCG the guest's side
 * of a login, a dropbear process and its key exchange, is 0.15-0.3 s). Only the worker can reach the
 * socket, and it is connected before the state loads (the guest then never sees the host side
 * close: a read would return end-of-file). The guest's answers are checked like those over SSH.
 */
export const AGENT_START = [
  'set -e',
  'command -v setsid >/dev/null',
  'dev=""',
  `for p in /sys/class/virtio-ports/*; do n=""; read -r n < "$p/name" || true; if [ "$n" = ${AGENT_PORT} ]; then dev=/dev/\${p##*/}; fi; done`,
  '[ -c "$dev" ]',
  "cat > /run/orchard-agent <<'AGENT'",
  's=""',
  `while IFS= read -r l; do [ "$l" = ${AGENT_END} ] && break; s="$s$l`,
  '"; done',
  `trap 'echo "${AGENT_EXIT}$?"' EXIT`,
  'eval "$s"',
  'AGENT',
  // one open (a port takes one), read and write
  'setsid sh /run/orchard-agent <>"$dev" >&0 2>&0 &',
].join('\n') + '\n';

/**
 * Runs `script` through the agent (AGENT_START, or the image's own: images.ts BOOT_AGENT_ARG) on
 * `sock` (QEMU's agent.sock) and resolves with its
 * output; rejects on a non-zero exit, a timeout, or more output than an identity script makes (the
 * guest writes what it likes). `onLine`: each line as it comes.
 */
export function runOverAgent(sock: Duplex, script: string, opts: { timeoutMs?: number; onLine?: (line: string) => void; keepOpen?: boolean } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    let out = '';
    let seen = 0;
    const lines: string[] = [];
    const timer = setTimeout(() => done(new Error(`the agent did not answer within ${(opts.timeoutMs ?? 30_000) / 1000} s`)), opts.timeoutMs ?? 30_000);
    let settled = false;
    const done = (err?: Error, code?: number) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      // keepOpen: for a next script (an agent that takes several: the image's own, started at boot)
      if (opts.keepOpen && !err) sock.off('data', onData).off('error', onError).off('end', onClosed).off('close', onClosed);
      else sock.destroy();
      if (err) reject(err);
      else if (code === 0) resolve(lines.join('\n') + '\n');
      else reject(new Error(`exit code ${code}${lines.length ? `: ${lines.slice(-3).join('; ')}` : ''}`));
    };
    const onData = (d: Buffer) => {
      out += d.toString('latin1');
      if (out.length > 65_536) return done(new Error('the agent said more than an identity script does'));
      for (let nl; (nl = out.indexOf('\n', seen)) >= 0; seen = nl + 1) {
        const line = out.slice(seen, nl).replace(/\r$/, '');
        if (line.startsWith(AGENT_EXIT)) return done(undefined, Number(line.slice(AGENT_EXIT.length)));
        lines.push(line);
        opts.onLine?.(line);
      }
    };
    const onError = (e: Error) => done(e);
    const onClosed = () => done(new Error('the agent\'s socket closed'));
    sock.on('data', onData).on('error', onError).on('end', onClosed).on('close', onClosed);
    sock.write(`${script}\n${AGENT_END}\n`);
  });
}

/** `s` single-quoted for a POSIX shell. */
const q = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;

export interface Identity {
  /** The VM's name: its hostname (made valid as cloud-init's seed does) */
  name: string;
  mac: string;
  machineId: string;
  hostKeys: HostKey[];
  username: string;
  password: string;
  /** `password` hashed for /etc/shadow (made here: the guest's mkpasswd costs it tens of ms under TCG) */
  passwordHash: string;
  /** The public key (OpenSSH line) authorized for the VM's user, as the cloud-init seed does. */
  authorizedKey?: string;
}

/** A new identity for `vm`; `mac`: the one QEMU gives the NIC on the VM's command line (a reboot then keeps it). */
export function newIdentity(vm: { name: string; username: string; password: string; authorizedKey?: string }, mac = newMac()): Identity {
  return { ...vm, mac, machineId: randomUUID().replaceAll('-', ''), hostKeys: newHostKeys(), passwordHash: sha512Crypt(vm.password) };
}

/** `bytes` as a printf format of octal escapes: binary data written by the shell's builtin printf. */
const octal = (bytes: Buffer) => [...bytes].map((b) => '\\' + b.toString(8).padStart(3, '0')).join('');

/**
 * The shell script (busybox ash, as root) that gives a guest `id`; it prints the guest's hostname and
 * MAC last. Idempotent: a worker that restarted during it runs it again. Under TCG every process
 * the guest starts costs 15-30 ms, so files are written with the shell's builtins (printf with
 * octal escapes for the binary keys, read loops rather than grep/awk/sed, the hostname written to
 * /proc, the password hash made on the worker): 5 processes in all.
 * Once the host keys are written it restarts dropbear, whose listener holds the keys it read at
 * start (this session's own process is not the listener and carries on), and says so with a line
 * DROPBEAR_RESTARTED, so that the worker can check the new listener while the script goes on. `guestIp`: the guest's address, for
 * the gratuitous ARP that tells QEMU's user-mode network the new MAC. `keepPasswords`: the user's
 * password stays as it is (a standby's warm-up: warmUpScript).
 */
export function identityScript(id: Identity, nowSeconds: number, guestIp = '10.0.2.15', opts: { keepPasswords?: boolean } = {}): string {
  const host = hostnameOf(id.name);
  const user = id.username;
  const home = user === 'root' ? '/root' : `/home/${user}`;
  return [
    'set -e',
    'umask 022',
    // the template's time, frozen at its save: the host's now
    `date -u -s @${Math.round(nowSeconds)} >/dev/null`,
    // mixed into the kernel's input pool (vmgenid has made it reseed already; this costs nothing)
    `printf '${octal(randomBytes(64))}' > /dev/urandom`,
    `printf '%s\\n' ${q(host)} > /etc/hostname`,
    `printf '%s' ${q(host)} > /proc/sys/kernel/hostname`,
    // /etc/hosts: the image's lines, but the 127.0.1.1 one names this VM
    'hosts=""',
    'while IFS= read -r l || [ -n "$l" ]; do case $l in 127.0.1.1[[:space:]]*) ;; *) hosts="$hosts$l\\n";; esac; done < /etc/hosts',
    `printf "%b127.0.1.1 %s\\n" "$hosts" ${q(host)} > /etc/hosts`,
    `printf '%s\\n' ${q(id.machineId)} > /etc/machine-id`,
    // the NIC: the first one that is not the loopback (QEMU gives the guest one)
    'for d in /sys/class/net/*; do if [ "${d##*/}" != lo ]; then dev=${d##*/}; break; fi; done',
    `ip link set dev "$dev" address ${q(id.mac)}`,
    `arping -U -c 1 -w 1 -I "$dev" ${q(guestIp)} >/dev/null 2>&1 || true`,
    // private from here on: the host keys, the new shadow file, the user's .ssh
    'umask 077',
    ...id.hostKeys.map((k) => `printf '${octal(k.dropbear)}' > /etc/dropbear/dropbear_${k.type}_host_key`),
    // and the agent's script, if it came that way (it is read already)
    'rm -f /etc/dropbear/dropbear_rsa_host_key /etc/dropbear/dropbear_dss_host_key /run/orchard-agent',
    'old=""; read -r old < /run/dropbear.pid || true',
    // The old listener's socket is gone once no socket listens on port 22 (0x16, state 0A); its
    // process may stay a zombie for a while, so /proc/PID says nothing.
    'listening() { for t in /proc/net/tcp /proc/net/tcp6; do [ -r "$t" ] || continue; while read -r _ a _ _ st _; do case "$a:$st" in *:0016:0A) return 0;; esac; done < "$t"; done; return 1; }',
    'if [ -n "$old" ]; then kill "$old" 2>/dev/null || true; i=0; while listening && [ $i -lt 2000 ]; do i=$((i + 1)); done; fi',
    'dropbear -p 22 -P /run/dropbear.pid',
    // the worker checks the new listener from outside meanwhile
    `echo ${q(DROPBEAR_RESTARTED)}`,
    // The VM's user and password, as the cloud-init seed makes them. Busybox here has no adduser or
    // chpasswd: the files are written directly.
    `u=${q(user)}`,
    'known=""',
    'while IFS=: read -r n _; do if [ "$n" = "$u" ]; then known=1; fi; done < /etc/passwd',
    ...(user === 'root' ? [] : [
      'if [ -z "$known" ]; then',
      '  n=999; while IFS=: read -r _ _ i _; do if [ "$i" -ge 1000 ] && [ "$i" -lt 60000 ] && [ "$i" -gt "$n" ]; then n=$i; fi; done < /etc/passwd; n=$((n + 1))',
      `  printf '%s:x:%s:%s::%s:/bin/bash\\n' "$u" "$n" "$n" ${q(home)} >> /etc/passwd`,
      `  printf '%s:x:%s:\\n' "$u" "$n" >> /etc/group`,
      `  printf '%s:!:19000::::::\\n' "$u" >> /etc/shadow`,
      `  mkdir -p ${q(home)}/.ssh && chown -R "$n:$n" ${q(home)} && chmod 755 ${q(home)}`,
      'fi',
    ]),
    `h=${q(id.passwordHash)}`,
    'shadow=""',
    'while IFS= read -r l || [ -n "$l" ]; do case $l in "$u":*) r=${l#*:}; r=${r#*:}; ' +
      `shadow="$shadow${opts.keepPasswords ? '$l' : '$u:$h:$r'}\\n";; *) shadow="$shadow$l\\n";; esac; done < /etc/shadow`,
    // in place (one write of a few hundred bytes) rather than a new file and mv: mv is a process
    'printf "%b" "$shadow" > /etc/shadow',
    ...(id.authorizedKey ? [
      // the image's key for the VM's user too (as the seed's ssh_authorized_keys)
      `k=${q(id.authorizedKey)}`,
      `f=${q(home)}/.ssh/authorized_keys`,
      'has=""',
      'if [ -f "$f" ]; then while IFS= read -r l; do if [ "$l" = "$k" ]; then has=1; fi; done < "$f"; fi',
      `if [ -z "$has" ]; then mkdir -p ${q(home)}/.ssh; printf '%s\\n' "$k" >> "$f"; chown -R "$u" ${q(home)}/.ssh; fi`,
    ] : []),
    // what the worker checks: the name and MAC the guest now has
    'read -r hn < /proc/sys/kernel/hostname; echo "$hn"',
    'read -r mac < "/sys/class/net/$dev/address"; echo "$mac"',
  ].join('\n') + '\n';
}

/**
 * What a standby (standby.ts) runs once resumed, before it waits for its VM: the identity script
 * with an identity of its own, as root and leaving every password as it is. Under TCG a resumed
 * guest runs each piece of code for the first time slowly (QEMU translates it), and a new QEMU has
 * translated nothing: the VM's own identity, given later by the same code, then takes a third of
 * the time (measured: 0.46-0.62 s first, 0.15-0.21 s after this).
 */
export function warmUpScript(mac: string, nowSeconds: number): string {
  const script = identityScript(newIdentity({ name: 'orchard-standby', username: 'root', password: randomUUID() }, mac), nowSeconds, undefined, { keepPasswords: true });
  // what the script runs for a user the image lacks (its home made)
  return script + 'd=/run/orchard-warm-up; mkdir -p $d/.ssh && chown -R 0:0 $d && chmod 755 $d && rm -rf $d\n';
}

/**
 * Logs in as root with `privateKey` over `sock` (the guest's port 22), runs `script` (on stdin, so
 * the password never shows on a command line) and resolves with its output; rejects with what failed.
 * `onHostKey` sees the host key the guest offered; `onLine` each line of output as it comes.
 */
export function runAsRoot(sock: Duplex, privateKey: Buffer, script: string, opts: { timeoutMs?: number; onHostKey?: (key: Buffer) => void; onLine?: (line: string) => void } = {}): Promise<string> {
  return new Promise((resolve, reject) => {
    const conn = new ssh2.Client();
    let out = '';
    let err = '';
    const timer = setTimeout(() => fail(new Error(`no answer within ${(opts.timeoutMs ?? 30_000) / 1000} s`)), opts.timeoutMs ?? 30_000);
    const fail = (e: Error) => {
      clearTimeout(timer);
      conn.end();
      sock.destroy();
      reject(e);
    };
    conn.on('error', (e) => fail(e));
    conn.on('ready', () => {
      conn.exec('sh -s', (e, ch) => {
        if (e) return fail(e);
        let seen = 0;
        ch.on('data', (d: Buffer) => {
          out += d.toString();
          for (let nl; opts.onLine && (nl = out.indexOf('\n', seen)) >= 0; seen = nl + 1) opts.onLine(out.slice(seen, nl));
        });
        ch.stderr.on('data', (d: Buffer) => (err += d.toString()));
        let code: number | null = null;
        ch.on('exit', (c: number | null) => (code = c));
        ch.on('close', () => {
          clearTimeout(timer);
          conn.end();
          if (code === 0) resolve(out);
          else reject(new Error(`exit code ${code}${err.trim() ? `: ${err.trim().split('\n').slice(-3).join('; ')}` : ''}`));
        });
        ch.end(script);
      });
    });
    conn.connect({
      sock, username: 'root', privateKey, readyTimeout: opts.timeoutMs ?? 30_000,
      hostVerifier: (key: Buffer) => {
        opts.onHostKey?.(key);
        return true;
      },
    });
  });
}

/**
 * The host key an SSH server offers on `sock`: the key exchange only, no login (the connection is
 * dropped once the key is seen). Under TCG that is most of an SSH session's cost, but not all.
 */
export function offeredHostKey(sock: Duplex, timeoutMs = 10_000): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const conn = new ssh2.Client();
    let key: Buffer | undefined;
    const timer = setTimeout(() => done(new Error(`no host key within ${timeoutMs / 1000} s`)), timeoutMs);
    const done = (err?: Error) => {
      clearTimeout(timer);
      conn.end();
      sock.destroy();
      if (key) resolve(key);
      else reject(err ?? new Error('the connection closed before the key exchange'));
    };
    conn.on('error', (e) => done(e));
    conn.on('close', () => done());
    conn.connect({
      sock, username: 'nobody', readyTimeout: timeoutMs,
      hostVerifier: (k: Buffer) => {
        key = k;
        setImmediate(() => done());
        return false;
      },
    });
  });
}

/** The public key blob of a known_hosts-style line (`TYPE BASE64`). */
export const keyBlob = (line: string) => Buffer.from(line.trim().split(/\s+/).at(-1) ?? '', 'base64');
