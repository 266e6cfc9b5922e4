// orchard context create|list|default|delete
import type { Command } from 'commander';
import { configPath, loadConfig, saveConfig, type Context } from '../../client/config.ts';
import { confirm, UsageError } from '../common.ts';
import { decodeBootstrapToken } from '../../api/bootstrap-token.ts';
import { parseOutput, print, table, type OutputFormat } from '../output.ts';
import * as lazy from '../../build/lazy.ts';

/** Normalises "AA:bb:..." / "aabb..." fingerprints for comparison. */
const normFingerprint = (f: string) => f.replace(/^sha256:/i, '').replace(/[^0-9a-f]/gi, '').toUpperCase();

export function registerContextCommands(program: Command) {
  const context = program.command('context').description('manage the controllers this CLI talks to');

  context
    .command('create')
    .description("add a controller: checks its certificate's fingerprint, pins it, verifies the credentials")
    .argument('<url>', 'controller URL, e.g. https://controller.example.com:6120')
    .option('--name <name>', 'name of the context', 'default')
    .option('--service-account-name <name>', 'service account to authenticate as')
    .option('--service-account-token <token>', 'its token')
    .option('--trust-fingerprint <sha256>', 'trust the certificate only if it has this SHA-256 fingerprint (non-interactive)')
    .option('-y, --yes', 'trust the presented certificate without asking (when you verify it some other way)')
    .option('--force', 'replace an existing context of the same name')
    .option('--bootstrap-token <token>', 'from `orchard get bootstrap-token NAME`: the credentials, and the certificate to pin (checked against the one presented)')
    .option('--no-pki', 'pin the presented certificate even when the system trusts it (as upstream\'s flag)')
    .option('--no-default', 'keep the current default context (by default the new context becomes the default)')
    .action(async (rawURL: string, opts: { name: string; serviceAccountName?: string; serviceAccountToken?: string; trustFingerprint?: string; yes?: boolean; force?: boolean; bootstrapToken?: string; pki: boolean; default: boolean }) => {
      const bootstrap = opts.bootstrapToken ? decodeBootstrapToken(opts.bootstrapToken) : undefined;
      if (bootstrap && (opts.serviceAccountName || opts.serviceAccountToken)) throw new UsageError('--bootstrap-token carries the credentials: leave out --service-account-name and --service-account-token');
      let url: URL;
      try {
        url = new URL(/^[a-z]+:\/\//i.test(rawURL) ? rawURL : `https://${rawURL}`);
      } catch {
        throw new UsageError(`"${rawURL}" is not a URL`);
      }
      if (url.protocol !== 'https:' && url.protocol !== 'http:') throw new UsageError('the controller URL must be https:// (or http:// for --insecure-no-tls controllers)');
      if (!url.port) url.port = '6120';
      const { OrchardClient, probeCertificate } = await lazy.client();
      const config = await loadConfig();
      if (config.contexts[opts.name] && !opts.force) throw new UsageError(`context "${opts.name}" exists; pass --force to replace it`);
      const ctx: Context = {
        // With the path: a controller run with --api-prefix serves its API under it.
        url: url.origin + url.pathname.replace(/\/+$/, ''),
        serviceAccountName: bootstrap?.serviceAccountName ?? opts.serviceAccountName,
        serviceAccountToken: bootstrap?.serviceAccountToken ?? opts.serviceAccountToken,
      };
      if (url.protocol === 'https:') {
        const cert = await probeCertificate(url.origin);
        if (bootstrap?.certificate) {
          // The bootstrap token says which certificate the controller has: the presented one must be it.
          if (bootstrap.certificate.trim() !== cert.pem.trim()) throw new Error(`the controller presents a certificate (SHA-256 ${cert.fingerprint}) other than the bootstrap token's; not trusting it`);
          ctx.certificate = cert.pem;
        } else if (!cert.trusted || !opts.pki) {
          process.stderr.write(`${cert.trusted ? "Pinning the controller's certificate (--no-pki)." : "The controller's certificate is not signed by an authority this system trusts."}\nSHA-256 fingerprint: ${cert.fingerprint}\n`);
          if (opts.trustFingerprint) {
            if (normFingerprint(opts.trustFingerprint) !== normFingerprint(cert.fingerprint)) {
              throw new Error(`the certificate's fingerprint ${cert.fingerprint} is not the expected ${opts.trustFingerprint}; not trusting it`);
            }
          } else if (!opts.yes) {
            if (!process.stdin.isTTY) throw new UsageError('refusing to trust an unverified certificate non-interactively: compare the fingerprint with the controller\'s log, then pass --trust-fingerprint SHA256 (or --yes)');
            if (!(await confirm('Trust it and pin it for this context? [y/N] '))) throw new Error('certificate not trusted; nothing saved');
          }
          ctx.certificate = cert.pem;
        }
      } else {
        process.stderr.write('warning: http:// sends the service account token in clear text\n');
      }
      const client = new OrchardClient(ctx);
      try {
        await client.info();
      } finally {
        client.close();
      }
      config.contexts[opts.name] = ctx;
      // The new context is the one the next commands use (upstream keeps an existing default: the
      // commands that followed then went, silently, to the old cluster). Said either way.
      const before = config['default-context'];
      if (opts.default || !before || !config.contexts[before]) config['default-context'] = opts.name;
      await saveConfig(config);
      const now = config['default-context'];
      const which = now === opts.name ? `it is the default context now${before && before !== opts.name ? ` (was "${before}")` : ''}` : `the default context is still "${now}" (orchard context default ${opts.name}, or --context ${opts.name})`;
      process.stderr.write(`context "${opts.name}" saved to ${configPath()}; ${which}\n`);
    });

  context
    .command('list')
    .description('list contexts')
    .option('-o, --output <format>', 'table, json or yaml', parseOutput, 'table' as OutputFormat)
    .action(async (opts: { output: OutputFormat }) => {
      const config = await loadConfig();
      const rows = Object.entries(config.contexts).map(([name, c]) => ({
        name,
        url: c.url,
        serviceAccountName: c.serviceAccountName,
        default: config['default-context'] === name,
        pinnedCertificate: Boolean(c.certificate),
      }));
      await print(opts.output, rows, () =>
        table(['NAME', 'URL', 'SERVICE ACCOUNT', 'DEFAULT', 'PINNED CERT'], rows.map((r) => [r.name, r.url, r.serviceAccountName, r.default ? '*' : '', r.pinnedCertificate ? 'yes' : 'no'])),
      );
    });

  context
    .command('default')
    .description('make a context the default')
    .argument('<name>')
    .action(async (name: string) => {
      const config = await loadConfig();
      if (!config.contexts[name]) throw new Error(`no context named "${name}"`);
      config['default-context'] = name;
      await saveConfig(config);
    });

  context
    .command('delete')
    .description('delete a context')
    .argument('<name>')
    .action(async (name: string) => {
      const config = await loadConfig();
      if (!config.contexts[name]) throw new Error(`no context named "${name}"`);
      delete config.contexts[name];
      if (config['default-context'] === name) delete config['default-context'];
      await saveConfig(config);
    });
}
