// create|list|get|delete of VMs, workers, service accounts and registry credentials; pause|resume worker; list|delete|adopt orphans;
// get|set cluster-settings; get bootstrap-token; logs vm.
import { readFileSync } from 'node:fs';
import { Command, Option } from 'commander';
import type { ClusterSettings, Event, Registry, ServiceAccount, VM, Worker } from '../../api/schemas.ts';
import { ROLES, SCHEDULER_PROFILES, type Role } from '../../api/enums.ts';
import { encodeBootstrapToken } from '../../api/bootstrap-token.ts';
import { VM_DEFAULTS } from '../../api/defaults.ts';
import { resolveContext } from '../../client/config.ts';
import { ApiError } from '../../client/errors.ts';
import { collect, collectKeyValue, collectList, parseInteger, UsageError, withClient, withCommon, type CommonOptions } from '../common.ts';
import { age, details, formatLabels, print, table } from '../output.ts';
import { statusOf, statusWithReason } from './power.ts';
import { waitForVM } from '../wait.ts';

/** What a VM asks for, else what it was given when placed (its worker's defaults). */
const cpuOf = (vm: VM) => vm.cpu || vm.assignedCPU;
const memoryOf = (vm: VM) => vm.memory || vm.assignedMemory;
const vmRow = (vm: VM) => [vm.name, vm.image, cpuOf(vm), memoryOf(vm), statusWithReason(vm), vm.worker, formatLabels(vm.labels), age(vm.createdAt)];
const VM_HEADERS = ['NAME', 'IMAGE', 'CPU', 'MEMORY', 'STATUS', 'WORKER', 'LABELS', 'AGE'];

function vmDetails(vm: VM): string {
  return details([
    ['name', vm.name],
    ['uid', vm.uid],
    ['image', vm.image],
    ['os/arch', `${vm.os}/${vm.arch}`],
    ['runtime', vm.runtime],
    ['cpu', cpuOf(vm) ?? "the worker's default"],
    ['memory', memoryOf(vm) !== undefined ? `${memoryOf(vm)} MiB` : "the worker's default"],
    ['disk size', vm.diskSize ? `${vm.diskSize} GB` : undefined],
    ['labels', formatLabels(vm.labels)],
    ['restart policy', vm.restart_policy],
    ['status', statusOf(vm)],
    ['power state', vm.powerState],
    ['status message', vm.status_message],
    ['worker', vm.worker],
    ['restarts', vm.restart_count],
    ['generation', `${vm.generation ?? 0} (observed ${vm.observedGeneration ?? '-'})`],
    ['created', vm.createdAt],
  ]);
}

const workerRow = (w: Worker) => [
  w.name,
  w.runtime,
  w.arch,
  formatLabels(w.resources),
  formatLabels(w.labels),
  w.scheduling_paused ? 'yes' : 'no',
  age(w.last_seen),
];
const WORKER_HEADERS = ['NAME', 'RUNTIME', 'ARCH', 'RESOURCES', 'LABELS', 'PAUSED', 'LAST SEEN'];

const saRow = (sa: ServiceAccount) => [sa.name, sa.roles.join(','), age(sa.createdAt)];

/**
 * `NAME/FIELD[/FIELD…]` as upstream's `orchard get vm macos/status`: the name and the field path.
 * A field is named by its JSON key or upstream's Go field name, in any case (`status_message`,
 * `StatusMessage`, `statusmessage`; `startup_script/script_content`).
 */
export function splitFieldPath(arg: string): { name: string; path: string[] } {
  const [name, ...path] = arg.split('/');
  return { name, path };
}

const fold = (key: string) => key.replace(/[^A-Za-z0-9]/g, '').toLowerCase();

/** The text of a field of `value` at `path`, or an error naming the field. Strings print as they are; anything else as JSON. */
export function lookupField(value: unknown, path: string[]): string {
  let current: unknown = value;
  for (const [i, element] of path.entries()) {
    const key = current !== null && typeof current === 'object' && !Array.isArray(current) ? Object.keys(current).find((k) => fold(k) === fold(element)) : undefined;
    if (key === undefined) {
      throw new UsageError(`failed to find the specified field "${path.slice(0, i + 1).join('/')}"${current !== null && typeof current === 'object' && !Array.isArray(current) ? ` (fields: ${Object.keys(current).join(', ')})` : ''}`);
    }
    current = (current as Record<string, unknown>)[key];
  }
  return typeof current === 'string' ? current : JSON.stringify(current);
}

function parseRoles(roles: string[]): Role[] {
  for (const r of roles) if (!(ROLES as readonly string[]).includes(r)) throw new UsageError(`unknown role "${r}"; roles are ${ROLES.join(', ')}`);
  return roles as Role[];
}

export function registerResourceCommands(program: Command) {
  const create = program.command('create').description('create a resource');
  const list = program.command('list').description('list resources').option('-q, --quiet', 'only the names (as upstream\'s `list -q`)');
  /** `list -q vms` or `list vms -q`: names only. */
  const quiet = (opts: { quiet?: boolean }) => opts.quiet || (list.opts() as { quiet?: boolean }).quiet;
  const names = (items: { name: string }[]) => items.map((i) => i.name + '\n').join('');
  const get = program.command('get').description('show a resource');
  const del = program.command('delete').description('delete a resource');
  const set = program.command('set').description('change a resource');

  // ---- VMs ----
  withCommon(
    create
      .command('vm')
      .description('create a VM; a worker picks it up and boots it')
      .argument('<name>', "VM name: letters, digits, '-', '_', '.', ':'")
      .requiredOption('--image <image>', 'image to boot (e.g. debian-dev, ghcr.io/cirruslabs/macos-sequoia-base:latest)')
      .option('--cpu <n>', `virtual CPUs (default ${VM_DEFAULTS.cpu})`, parseInteger('--cpu'))
      .option('--memory <mib>', `memory in MiB (default ${VM_DEFAULTS.memory})`, parseInteger('--memory'))
      .option('--disk-size <gb>', 'disk size in GB', parseInteger('--disk-size'))
      .option('--os <os>', 'darwin or linux')
      .option('--arch <arch>', 'arm64 or amd64')
      .option('--runtime <runtime>', 'tart, qemu, synthetic, ...')
      .option('--label, --labels <key=value[,...]>', 'require worker labels (repeatable)', collectKeyValue)
      .option('--resources <name=amount[,...]>', 'require worker resources (repeatable)', collectKeyValue)
      .option('--username <user>', 'SSH user of the guest (default admin)')
      .option('--password <password>', 'SSH password of the guest (default admin)')
      .option('--startup-script <script>', 'script to run once the guest is up (@FILE reads a file)')
      .option('--startup-script-env <key=value>', 'environment of the startup script (repeatable)', collectKeyValue)
      .addOption(new Option('--restart-policy <policy>', 'what to do when the VM fails').choices(['Never', 'OnFailure']))
      .addOption(new Option('--image-pull-policy <policy>', 'when to pull the image').choices(['IfNotPresent', 'Always']))
      .option('--net-softnet', 'isolate the VM with Softnet (Tart)')
      .option('--net-softnet-allow <cidr[,...]>', 'Softnet: allow these networks (Tart)', collectList)
      .option('--net-softnet-block <cidr[,...]>', 'Softnet: block these networks (Tart)', collectList)
      .option('--net-bridged <interface>', 'bridge the VM to this host interface (Tart)')
      .option('--nested', 'enable nested virtualisation')
      .option('--headless', 'no graphics')
      .option('--suspendable', 'the VM may be suspended (orchard suspend vm keeps its memory; start resumes it)')
      .option('--random-serial', 'a random serial number (Tart)')
      .option('--host-dir, --host-dirs <name:path[:ro][,...]>', 'share host directories (repeatable)', collectList)
      .option('--wait [seconds]', 'then wait until it runs, showing its progress (default 600 s)', parseInteger('--wait')),
  ).action(
    async (
      name: string,
      opts: CommonOptions & {
        image: string;
        cpu?: number;
        memory?: number;
        diskSize?: number;
        os?: VM['os'];
        arch?: VM['arch'];
        runtime?: string;
        labels?: Record<string, string>;
        resources?: Record<string, string>;
        username?: string;
        password?: string;
        startupScript?: string;
        startupScriptEnv?: Record<string, string>;
        restartPolicy?: VM['restart_policy'];
        imagePullPolicy?: VM['imagePullPolicy'];
        netSoftnet?: boolean;
        netSoftnetAllow?: string[];
        netSoftnetBlock?: string[];
        netBridged?: string;
        nested?: boolean;
        headless?: boolean;
        suspendable?: boolean;
        randomSerial?: boolean;
        hostDirs?: string[];
        wait?: number | true;
      },
    ) => {
      const resources: Record<string, number> = {};
      for (const [k, v] of Object.entries(opts.resources ?? {})) {
        if (!/^\d+$/.test(v)) throw new UsageError(`--resources ${k}=${v}: the amount must be a whole number`);
        resources[k] = Number(v);
      }
      const vm: VM = {
        name,
        image: opts.image,
        cpu: opts.cpu,
        memory: opts.memory,
        diskSize: opts.diskSize,
        os: opts.os,
        arch: opts.arch,
        runtime: opts.runtime,
        labels: opts.labels,
        resources: Object.keys(resources).length ? resources : undefined,
        username: opts.username,
        password: opts.password,
        restart_policy: opts.restartPolicy,
        imagePullPolicy: opts.imagePullPolicy,
        netSoftnet: opts.netSoftnet,
        netSoftnetAllow: opts.netSoftnetAllow,
        netSoftnetBlock: opts.netSoftnetBlock,
        'net-bridged': opts.netBridged,
        nested: opts.nested,
        headless: opts.headless,
        suspendable: opts.suspendable,
        randomSerial: opts.randomSerial,
        hostDirs: opts.hostDirs?.map((spec) => {
          const [dirName, path, ro] = spec.split(':');
          if (!dirName || !path || (ro !== undefined && ro !== 'ro')) throw new UsageError(`--host-dir must be NAME:PATH or NAME:PATH:ro, got "${spec}"`);
          return { name: dirName, path, ro: ro === 'ro' };
        }),
      };
      if (opts.startupScript !== undefined) {
        const content = opts.startupScript.startsWith('@') ? readFileSync(opts.startupScript.slice(1), 'utf8') : opts.startupScript;
        vm.startup_script = { script_content: content, env: opts.startupScriptEnv };
      }
      for (const k of Object.keys(vm) as (keyof VM)[]) if (vm[k] === undefined) delete vm[k];
      const created = await withClient(opts, async (c) => {
        const made = await c.createVM(vm);
        if (opts.wait === undefined) return made;
        process.stderr.write(`VM ${made.name} created\n`);
        const seconds = opts.wait === true ? 600 : opts.wait;
        return waitForVM(c, made.name, { what: 'running', done: (v) => v.status === 'running', seconds, flag: '--wait' });
      });
      await print(opts.output, created, () => (created.status === 'running' ? `VM ${created.name} running on worker ${created.worker}\n` : `VM ${created.name} created (${created.status})\n`));
    },
  );

  withCommon(list.command('vms').description('list VMs').option('--worker <name>', 'only the VMs of this worker').option('-q, --quiet', 'only the names')).action(
    async (opts: CommonOptions & { worker?: string; quiet?: boolean }) => {
      const vms = await withClient(opts, (c) => c.listVMs(opts.worker));
      await print(opts.output, vms, () => (quiet(opts) ? names(vms) : table(VM_HEADERS, vms.map(vmRow))));
    },
  );

  withCommon(
    get
      .command('vm')
      .description('show a VM, or one of its fields (NAME/FIELD: `orchard get vm macos/status`)')
      .argument('<name>', 'NAME or NAME/FIELD[/FIELD...]')
      .option('--ip', "print only the VM's IP address (resolved on its worker; needs compute:write or compute:connect)")
      .option('--wait <seconds>', 'with --ip: how long to wait for the VM to be running', parseInteger('--wait'), 10),
  ).action(async (arg: string, opts: CommonOptions & { ip?: boolean; wait: number }) => {
    const { name, path } = splitFieldPath(arg);
    if (opts.ip) {
      if (path.length) throw new UsageError('--ip takes a VM name, not NAME/FIELD');
      const ip = await withClient(opts, (c) => c.vmIP(name, opts.wait));
      await print(opts.output, { ip }, () => ip + '\n');
      // QEMU's user-mode network (the qemu runtime): the address exists only inside the VM's own network.
      if (opts.output === 'table' && ip.startsWith('10.0.2.')) {
        process.stderr.write(`note: ${ip} is the VM's address in its own private network on its worker (QEMU user-mode networking), not reachable from elsewhere; reach the VM with: orchard ssh vm ${name}, or orchard port-forward vm ${name} LOCAL:PORT\n`);
      }
      return;
    }
    const vm = await withClient(opts, (c) => c.getVM(name));
    if (path.length) {
      process.stdout.write(lookupField(vm, path) + '\n');
      return;
    }
    await print(opts.output, vm, () => vmDetails(vm));
  });

  withCommon(del.command('vm').description('delete a VM (its worker stops it and removes its disk)').argument('<name>'), false).action(
    async (name: string, opts: CommonOptions) => {
      await withClient(opts, (c) => c.deleteVM(name));
      process.stderr.write(`VM ${name} deleted\n`);
    },
  );

  withCommon(
    program
      .command('logs')
      .description('show logs')
      .command('vm')
      .description("a VM's events: lifecycle steps and startup script output")
      .argument('<name>')
      .option('--limit <n>', 'at most this many events', parseInteger('--limit'))
      .option('--tail <n>', 'the last N events, newest first (as upstream\'s; same as --limit N --order desc)', parseInteger('--tail'))
      .addOption(new Option('--order <order>', 'oldest (asc) or newest (desc) first').choices(['asc', 'desc']).default('asc'))
      .option('-f, --follow', 'then print new events as they come, until the VM is deleted or Ctrl-C'),
  ).action(async (name: string, opts: CommonOptions & { limit?: number; tail?: number; order: 'asc' | 'desc'; follow?: boolean }) => {
    if (opts.tail !== undefined && opts.tail > 0) {
      opts.limit = opts.tail;
      opts.order = 'desc';
    }
    const line = (e: Event) => `${new Date((e.timestamp ?? 0) * 1000).toISOString()} ${e.kind ?? ''}: ${(e.payload ?? '').replace(/\n$/, '')}\n`;
    await withClient(opts, async (c) => {
      const events: Event[] = [];
      let cursor: string | undefined;
      let newest: string | undefined;
      do {
        const want = opts.limit !== undefined ? Math.min(1000, opts.limit - events.length) : 1000;
        const page = await c.listEvents(name, { limit: want, order: opts.order, cursor });
        events.push(...page.events);
        cursor = page.nextCursor;
        if (!newest || opts.order === 'asc') newest = page.newestCursor ?? newest;
      } while (cursor && (opts.limit === undefined || events.length < opts.limit));
      if (!opts.follow) return await print(opts.output, events, () => events.map(line).join(''));
      // Following: one event per line (JSON lines with -o json), oldest first, then what is appended.
      const show = (e: Event) => process.stdout.write(opts.output === 'table' ? line(e) : JSON.stringify(e) + '\n');
      (opts.order === 'desc' ? events.reverse() : events).forEach(show);
      const stop = new AbortController();
      process.once('SIGINT', () => stop.abort());
      const gone = () => void process.stderr.write(`VM ${name} was deleted\n`);
      if ((await c.info()).capabilities.includes('vm-events-watch')) {
        // Our controller pushes each event as it is committed (a watch, no polling); when the watch
        // ends otherwise (the controller restarted, this reader fell behind) it resumes from the last cursor.
        let pause = 250;
        while (!stop.signal.aborted) {
          try {
            for await (const line of c.watchEvents(name, { cursor: newest, signal: stop.signal })) {
              if (line.type === 'DELETED') return gone();
              if (line.type !== 'ADDED') continue;
              show(line.object as Event);
              newest = line.cursor ?? newest;
              pause = 250;
            }
          } catch (err) {
            if (err instanceof ApiError && err.status === 404) return gone();
            if (stop.signal.aborted) return;
            process.stderr.write(`following ${name}'s events again: ${(err as Error).message}\n`);
          }
          await new Promise((r) => setTimeout(r, pause));
          pause = Math.min(pause * 2, 5000);
        }
        return;
      }
      // A controller without event watches (upstream's): asked each second for what came after the newest cursor.
      while (!stop.signal.aborted) {
        await new Promise((r) => setTimeout(r, 1000));
        let page;
        try {
          page = await c.listEvents(name, { limit: 1000, order: 'asc', cursor: newest });
        } catch (err) {
          if (err instanceof ApiError && err.status === 404) return gone();
          throw err;
        }
        page.events.forEach(show);
        newest = page.newestCursor ?? newest;
      }
    });
  });

  // ---- workers ----
  withCommon(list.command('workers').description('list workers').option('-q, --quiet', 'only the names')).action(async (opts: CommonOptions & { quiet?: boolean }) => {
    const workers = await withClient(opts, (c) => c.listWorkers());
    await print(opts.output, workers, () => (quiet(opts) ? names(workers) : table(WORKER_HEADERS, workers.map(workerRow))));
  });
  withCommon(get.command('worker').description('show a worker, or one of its fields (NAME/FIELD)').argument('<name>', 'NAME or NAME/FIELD[/FIELD...]')).action(async (arg: string, opts: CommonOptions) => {
    const { name, path } = splitFieldPath(arg);
    const w = await withClient(opts, (c) => c.getWorker(name));
    if (path.length) return void process.stdout.write(lookupField(w, path) + '\n');
    await print(opts.output, w, () => table(WORKER_HEADERS, [workerRow(w)]));
  });
  withCommon(del.command('worker').description('delete a worker').argument('<name>'), false).action(async (name: string, opts: CommonOptions) => {
    await withClient(opts, (c) => c.deleteWorker(name));
    process.stderr.write(`worker ${name} deleted\n`);
  });
  for (const [verb, paused] of [
    ['pause', true],
    ['resume', false],
  ] as const) {
    const cmd = program
      .command(verb)
      .description(`${verb} scheduling on a worker`)
      .command('worker')
      .description(paused ? 'place no new VMs on this worker (running ones stay)' : 'place new VMs on this worker again')
      .argument('<name>');
    if (paused) cmd.option('--wait <seconds>', "then wait up to this long until none of its VMs runs (as upstream's)", parseInteger('--wait'));
    withCommon(cmd, false).action(async (name: string, opts: CommonOptions & { wait?: number }) => {
      await withClient(opts, async (c) => {
        await c.updateWorker({ name, scheduling_paused: paused });
        process.stderr.write(`worker ${name} ${paused ? 'paused' : 'resumed'}\n`);
        if (!paused || !opts.wait) return;
        const deadline = Date.now() + opts.wait * 1000;
        for (;;) {
          const active = (await c.listVMs(name)).filter((vm) => vm.status !== 'failed');
          if (!active.length) return;
          if (Date.now() > deadline) throw new Error(`worker ${name} still runs ${active.length} VM${active.length === 1 ? '' : 's'} after ${opts.wait}s: ${active.map((v) => v.name).join(', ')}`);
          process.stderr.write(`waiting for ${active.length} VM${active.length === 1 ? '' : 's'} on worker ${name} to stop…\n`);
          await new Promise((r) => setTimeout(r, 1000));
        }
      });
    });
  }

  // ---- orphans: VMs workers run that the controller does not know ----
  withCommon(list.command('orphans').description('list VMs that workers run but the controller does not know (it lost or swapped its data)')).action(
    async (opts: CommonOptions) => {
      const workers = await withClient(opts, (c) => c.listWorkers());
      const orphans = workers.flatMap((w) => (w.orphans ?? []).map((o) => ({ worker: w.name, ...o })));
      await print(opts.output, orphans, () =>
        table(['WORKER', 'LOCAL NAME', 'VM', 'IMAGE', 'RUNNING', 'SINCE'], orphans.map((o) => [o.worker, o.localName, o.name, o.image, o.running === undefined ? '' : o.running ? 'yes' : 'no', age(o.since)])),
      );
    },
  );
  withCommon(del.command('orphan').description('stop an orphan and remove its disk').argument('<worker>').argument('<local-name>'), false).action(
    async (worker: string, localName: string, opts: CommonOptions) => {
      await withClient(opts, (c) => c.deleteOrphan(worker, localName));
      process.stderr.write(`orphan ${localName} on worker ${worker} deleted: the worker removes it\n`);
    },
  );
  withCommon(
    program
      .command('adopt')
      .description('take over what the controller does not know')
      .command('orphan')
      .description('know an orphan again as the VM it was, on its worker')
      .argument('<worker>')
      .argument('<local-name>'),
    false,
  ).action(async (worker: string, localName: string, opts: CommonOptions) => {
    const o = await withClient(opts, (c) => c.adoptOrphan(worker, localName));
    process.stderr.write(`orphan ${localName} adopted as VM ${o.name ?? '?'} on worker ${worker}\n`);
  });

  // ---- service accounts ----
  withCommon(
    create
      .command('service-account')
      .description('create a service account (its token is generated unless given)')
      .argument('<name>')
      .option('--roles <role>', `a role (repeatable): ${ROLES.join(', ')}`, collect, [])
      .option('--token <token>', 'use this token instead of a generated one'),
  ).action(async (name: string, opts: CommonOptions & { roles: string[]; token?: string }) => {
    const sa = await withClient(opts, (c) => c.createServiceAccount({ name, roles: parseRoles(opts.roles), token: opts.token }));
    await print(opts.output, sa, () => `service account ${sa.name} created with roles ${sa.roles.join(', ') || '(none)'}\n`);
  });
  withCommon(list.command('service-accounts').description('list service accounts').option('-q, --quiet', 'only the names')).action(async (opts: CommonOptions & { quiet?: boolean }) => {
    const sas = await withClient(opts, (c) => c.listServiceAccounts());
    await print(opts.output, sas, () => (quiet(opts) ? names(sas) : table(['NAME', 'ROLES', 'AGE'], sas.map(saRow))));
  });
  withCommon(get.command('service-account').description('show a service account, or one of its fields (NAME/FIELD: `workers/token`)').argument('<name>', 'NAME or NAME/FIELD[/FIELD...]')).action(async (arg: string, opts: CommonOptions) => {
    const { name, path } = splitFieldPath(arg);
    const sa = await withClient(opts, (c) => c.getServiceAccount(name));
    if (path.length) return void process.stdout.write(lookupField(sa, path) + '\n');
    await print(opts.output, sa, () => table(['NAME', 'ROLES', 'AGE'], [saRow(sa)]));
  });
  withCommon(del.command('service-account').description('delete a service account').argument('<name>'), false).action(
    async (name: string, opts: CommonOptions) => {
      await withClient(opts, (c) => c.deleteServiceAccount(name));
      process.stderr.write(`service account ${name} deleted\n`);
    },
  );

  withCommon(
    get
      .command('bootstrap-token')
      .description("print a token for `orchard worker run --bootstrap-token`: a service account's credentials and the controller certificate")
      .argument('<service-account>'),
    false,
  ).action(async (name: string, opts: CommonOptions) => {
    const { context } = await resolveContext(opts.context);
    const sa = await withClient(opts, (c) => c.getServiceAccount(name));
    if (!sa.token) throw new Error(`service account "${name}" has no token`);
    process.stdout.write(encodeBootstrapToken({ serviceAccountName: sa.name, serviceAccountToken: sa.token, certificate: context.certificate }) + '\n');
  });

  // ---- registry credentials (the password goes in, never comes back) ----
  const registryRow = (r: Registry) => [r.host, r.username, r.passwordSet ? 'yes' : 'no', r.insecure ? 'yes' : 'no', r.ca ? 'yes' : 'no', age(r.createdAt)];
  const REGISTRY_HEADERS = ['HOST', 'USERNAME', 'PASSWORD', 'INSECURE', 'CA', 'AGE'];
  withCommon(
    create
      .command('registry')
      .description('set the credentials workers pull images of a registry with (needs admin:write; every worker gets them in clear)')
      .argument('<host>', 'registry host[:port], as image references name it (ghcr.io, registry.local:5000)')
      .option('--username <user>', 'user name to sign in with')
      .option('--password-stdin', 'read the password (or token) from standard input')
      .option('--insecure', 'plain HTTP instead of HTTPS')
      .option('--ca-file <file>', "PEM certificate(s) the registry's certificate must chain to"),
  ).action(async (host: string, opts: CommonOptions & { username?: string; passwordStdin?: boolean; insecure?: boolean; caFile?: string }) => {
    let password: string | undefined;
    if (opts.passwordStdin) {
      const chunks: Buffer[] = [];
      for await (const chunk of process.stdin) chunks.push(chunk as Buffer);
      password = Buffer.concat(chunks).toString('utf8').replace(/\r?\n$/, '');
      if (!password) throw new UsageError('--password-stdin: standard input was empty');
      if (!opts.username) throw new UsageError('--password-stdin needs --username');
    }
    const ca = opts.caFile !== undefined ? readFileSync(opts.caFile, 'utf8') : undefined;
    const r = await withClient(opts, (c) => c.createRegistry({ host, username: opts.username, password, insecure: opts.insecure, ca }));
    await print(opts.output, r, () => `registry ${r.host} created${r.passwordSet ? ' (with a password)' : ''}\n`);
  });
  withCommon(list.command('registries').description('list registry credentials (never their passwords)').option('-q, --quiet', 'only the hosts')).action(async (opts: CommonOptions & { quiet?: boolean }) => {
    const rs = await withClient(opts, (c) => c.listRegistries());
    await print(opts.output, rs, () => (quiet(opts) ? rs.map((r) => r.host + '\n').join('') : table(REGISTRY_HEADERS, rs.map(registryRow))));
  });
  withCommon(get.command('registry').description("show a registry's credentials (never the password), or one field (HOST/FIELD)").argument('<host>', 'HOST or HOST/FIELD')).action(async (arg: string, opts: CommonOptions) => {
    const { name, path } = splitFieldPath(arg);
    const r = await withClient(opts, (c) => c.getRegistry(name));
    if (path.length) return void process.stdout.write(lookupField(r, path) + '\n');
    await print(opts.output, r, () => table(REGISTRY_HEADERS, [registryRow(r)]));
  });
  withCommon(del.command('registry').description("delete a registry's credentials").argument('<host>'), false).action(async (host: string, opts: CommonOptions) => {
    await withClient(opts, (c) => c.deleteRegistry(host));
    process.stderr.write(`registry ${host} deleted\n`);
  });

  // ---- cluster settings ----
  withCommon(get.command('cluster-settings').description('show the cluster settings')).action(async (opts: CommonOptions) => {
    const s = await withClient(opts, (c) => c.getClusterSettings());
    await print(opts.output, s, () =>
      details([
        ['scheduler profile', s.schedulerProfile],
        ['host dir policies', (s.hostDirPolicies ?? []).map((p) => `${p.pathPrefix}${p.ro ? ' (ro)' : ''}`).join(', ')],
      ]),
    );
  });
  withCommon(
    set
      .command('cluster-settings')
      .description('change the cluster settings')
      .addOption(new Option('--scheduler-profile <profile>', 'how VMs are spread over workers').choices([...SCHEDULER_PROFILES]))
      .option('--host-dir-policy <prefix[:ro]>', 'allow hostDirs under this path (repeatable; replaces the list)', collect)
      .option('--host-dir-policies <prefix[:ro][,...]>', "add these to the allowed hostDir paths (as upstream's: comma-separated, added to the list)", collectList),
  ).action(async (opts: CommonOptions & { schedulerProfile?: ClusterSettings['schedulerProfile']; hostDirPolicy?: string[]; hostDirPolicies?: string[] }) => {
    const policy = (p: string) => (p.endsWith(':ro') ? { pathPrefix: p.slice(0, -3), ro: true } : { pathPrefix: p });
    const change: ClusterSettings = {};
    if (opts.schedulerProfile) change.schedulerProfile = opts.schedulerProfile;
    if (opts.hostDirPolicy) change.hostDirPolicies = opts.hostDirPolicy.map(policy);
    if (!Object.keys(change).length && !opts.hostDirPolicies) throw new UsageError('nothing to change: pass --scheduler-profile, --host-dir-policy or --host-dir-policies');
    // PUT replaces the settings (as upstream's): send the current ones with the change.
    const s = await withClient(opts, async (c) => {
      const current = await c.getClusterSettings();
      const next = { ...current, ...change };
      if (opts.hostDirPolicies) next.hostDirPolicies = [...(next.hostDirPolicies ?? []), ...opts.hostDirPolicies.map(policy)];
      return c.setClusterSettings(next);
    });
    await print(opts.output, s, () => 'cluster settings updated\n');
  });
}
