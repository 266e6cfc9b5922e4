// The `orchard` command: one program for the controller, the workers and the users.
// Start-up loads commander and the commands' definitions only: what a command needs (the client, the
// controller, the worker, pino, ssh2) is imported when it runs (bench/executable.ts measures this).
import { Command, CommanderError } from 'commander';
import { commit, VERSION } from '../api/version.ts';
import { registerControllerCommands } from './commands/controller.ts';
import { registerContextCommands } from './commands/context.ts';
import { registerResourceCommands } from './commands/resources.ts';
import { registerWorkerCommands } from './commands/worker.ts';
import { registerDevCommand } from './commands/dev.ts';
import { registerConnectCommands } from './commands/connect.ts';
import { registerPowerCommands } from './commands/power.ts';
import { UsageError, errorText } from './common.ts';
import { registerCompletionCommands } from './completion.ts';

/**
 * Commander's "error: unknown command 'lst'\n(Did you mean list?)" as
 * "orchard: unknown command 'lst'. Did you mean 'list'?".
 */
function usageErrorText(message: string): string {
  const [first, ...rest] = message.trim().replace(/^error: /, '').split('\n');
  const suggestion = /^\(Did you mean (one of )?(.+)\?\)$/.exec(rest.join(' ').trim());
  if (!suggestion) return `orchard: ${[first, ...rest].join('\n')}\n`;
  const quoted = suggestion[2].split(', ').map((s) => `'${s}'`).join(', ');
  return `orchard: ${first}. Did you mean ${suggestion[1] ?? ''}${quoted}?\n`;
}

/** After a usage error, each command names where to look: `orchard get vm --help`, with its usage line. */
function hintAfterUsageErrors(cmd: Command, path: string[] = []) {
  const name = ['orchard', ...path].join(' ');
  const visible = cmd.commands.filter((c) => !(c as Command & { _hidden?: boolean })._hidden);
  cmd.showHelpAfterError(
    visible.length
      ? `run "${name} --help" for the ${path.length ? 'subcommands' : 'commands'}`
      : `usage: ${name} ${cmd.usage()}\nrun "${name} --help" for more`,
  );
  for (const sub of cmd.commands) hintAfterUsageErrors(sub, [...path, sub.name()]);
}

const program = new Command('orchard')
  .description('Orchard: run virtual machines on a cluster of hosts (QEMU on Linux, Tart on macOS)')
  // Not commander's .version(text): the commit is looked up (a checkout asks git) only when asked for.
  .option('-V, --version', 'output the version and the git commit')
  .on('option:version', () => {
    const text = `orchard ${VERSION} (commit ${commit()})`;
    process.stdout.write(text + '\n');
    throw new CommanderError(0, 'commander.version', text);
  })
  .exitOverride()
  // A usage error is one line and a hint where to look (set per command below), not the whole help.
  .configureOutput({ outputError: (message, write) => write(usageErrorText(message)) })
  // Needed for any command's positional options (`orchard controller --data-dir DIR run`): the program has only --version and --help.
  .enablePositionalOptions();

registerControllerCommands(program);
registerContextCommands(program);
registerResourceCommands(program);
registerPowerCommands(program);
registerWorkerCommands(program);
registerDevCommand(program);
registerConnectCommands(program);
registerCompletionCommands(program);
hintAfterUsageErrors(program);

/** The long names of every boolean flag (`--nested`, `--no-pki`), in any command. */
function booleanFlags(cmd: Command, into = new Set<string>()): Set<string> {
  for (const o of cmd.options) if (!o.required && !o.optional && o.long) into.add(o.long);
  for (const sub of cmd.commands) booleanFlags(sub, into);
  return into;
}

/**
 * Go's flag forms for booleans, as upstream's users type them: `--nested=true` is `--nested`,
 * `--headless=false` is leaving the flag out (none of ours is on by default).
 */
function goBooleans(argv: string[], flags: Set<string>): string[] {
  const out: string[] = [];
  for (const [i, arg] of argv.entries()) {
    const m = /^(--[A-Za-z0-9-]+)=(true|false|TRUE|FALSE|True|False|t|f|T|F|1|0)$/.exec(arg);
    if (i < 2 || !m || !flags.has(m[1]) || argv.slice(2, i).includes('--')) out.push(arg);
    else if (/^(true|t|1)$/i.test(m[2])) out.push(m[1]);
  }
  return out;
}

// No top-level await: the single executable runs this file bundled as a CommonJS script.
program.parseAsync(goBooleans(process.argv, booleanFlags(program))).catch((err: unknown) => {
  if (err instanceof CommanderError) {
    // Help and version are not errors; commander already printed its usage message.
    process.exitCode = err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help' ? 0 : 2;
  } else {
    const e = err as Error & { code?: string };
    process.stderr.write(`orchard: ${errorText(e)}\n`);
    if (process.env.ORCHARD_DEBUG && e.stack) process.stderr.write(e.stack + '\n');
    process.exitCode = e instanceof UsageError ? 2 : 1;
  }
});
