// The `orchard` command: one program for the controller, the workers and the users.
// Start-up loads commander and the commands' definitions only: what a command needs (the client, the
// controller, the worker, pino, ssh2) is imported when it runs (bench/executable.ts measures this).
import { Command, CommanderError } from 'commander';
import { ApiError } from '../client/errors.ts';
import { commit, VERSION } from '../api/version.ts';
import { registerControllerCommands } from './commands/controller.ts';
import { registerContextCommands } from './commands/context.ts';
import { registerResourceCommands } from './commands/resources.ts';
import { registerWorkerCommands } from './commands/worker.ts';
import { registerDevCommand } from './commands/dev.ts';
import { registerConnectCommands } from './commands/connect.ts';
import { UsageError } from './common.ts';

const program = new Command('orchard')
  .description('Orchard: run virtual machines on a cluster of hosts (QEMU on Linux, Tart on macOS)')
  // Not commander's .version(text): the commit is looked up (a checkout asks git) only when asked for.
  .option('-V, --version', 'output the version and the git commit')
  .on('option:version', () => {
    const text = `orchard ${VERSION} (commit ${commit()})`;
    process.stdout.write(text + '\n');
    throw new CommanderError(0, 'commander.version', text);
  })
  .showHelpAfterError()
  .exitOverride();

registerControllerCommands(program);
registerContextCommands(program);
registerResourceCommands(program);
registerWorkerCommands(program);
registerDevCommand(program);
registerConnectCommands(program);

// No top-level await: the single executable runs this file bundled as a CommonJS script.
program.parseAsync(process.argv).catch((err: unknown) => {
  if (err instanceof CommanderError) {
    // Help and version are not errors; commander already printed its usage message.
    process.exitCode = err.code === 'commander.helpDisplayed' || err.code === 'commander.version' || err.code === 'commander.help' ? 0 : 2;
  } else {
    const e = err as Error & { code?: string };
    process.stderr.write(`orchard: ${e instanceof ApiError ? `${e.message} (HTTP ${e.status})` : e.message}\n`);
    if (process.env.ORCHARD_DEBUG && e.stack) process.stderr.write(e.stack + '\n');
    process.exitCode = e instanceof UsageError ? 2 : 1;
  }
});
