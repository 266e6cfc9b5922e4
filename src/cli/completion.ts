// `orchard completion bash|zsh|fish`: a completion script made from the command tree (commands,
// subcommands, flags, what each argument and flag value is), and the hidden `orchard __complete KIND`
// that the script calls for the names it cannot know: VMs, workers, service accounts, contexts.
import { Argument, type Command, type Option } from 'commander';
import { loadConfig } from '../client/config.ts';
import { clientFor } from './common.ts';

/**
 * What a word is completed with: names asked of `orchard __complete` (vms, workers, service-accounts, registries,
 * contexts), files, directories, `@a,b,c` (one of these), or `-` (nothing to offer).
 */
export type Kind = 'vms' | 'workers' | 'service-accounts' | 'registries' | 'contexts' | 'files' | 'dirs' | `@${string}` | '-';

/** One command of the tree, as the scripts see it. */
export interface Spec {
  /** The words that lead to it: '' for `orchard` itself, 'get vm' for `orchard get vm`. */
  path: string;
  commands: string[];
  flags: string[];
  /** Flags that take a value, each with what the value is. */
  valued: [flag: string, kind: Kind][];
  /** The positional arguments' kinds; `variadic`: the last repeats. */
  args: Kind[];
  variadic: boolean;
}

/** How long `orchard __complete` may take before it gives up, printing nothing: a TAB must not hang. */
const COMPLETE_TIMEOUT_MS = 2000;

/** What a flag's value is, from the flag's name, its choices and its placeholder (`<dir>`, `<file>`). */
function flagKind(o: Option): Kind {
  if (o.argChoices?.length) return `@${o.argChoices.join(',')}`;
  if (o.long === '--context') return 'contexts';
  if (o.long === '--output') return '@table,json,yaml';
  if (o.long === '--worker') return 'workers';
  const placeholder = /[<[]([^>\]]+)[>\]]/.exec(o.flags)?.[1] ?? '';
  if (/dir/.test(placeholder)) return 'dirs';
  if (/file/.test(placeholder)) return 'files';
  return '-';
}

/**
 * What an argument is, from where it is: the NAME of `get vm`, `delete vm`, `ssh vm`… is a VM (not
 * that of `create vm`: a new name), `<worker>` a worker, `context default NAME` a context.
 */
function argKind(path: string[], arg: Argument, index: number): Kind {
  if (arg.argChoices?.length) return `@${arg.argChoices.join(',')}`;
  const name = arg.name();
  const [verb] = path;
  const noun = path.at(-1);
  if (name === 'worker') return 'workers';
  if (name === 'service-account') return 'service-accounts';
  if (/^(file|path)$/.test(name)) return 'files';
  if (/^dir/.test(name)) return 'dirs';
  if (index === 0 && verb !== 'create') {
    if (noun === 'vm') return 'vms';
    if (noun === 'worker') return 'workers';
    if (noun === 'service-account') return 'service-accounts';
    if (noun === 'registry') return 'registries';
    if (verb === 'context' && (noun === 'default' || noun === 'delete')) return 'contexts';
  }
  return '-';
}

/** Every visible command of the tree, depth first, with its flags and arguments. */
export function commandSpecs(cmd: Command, path: string[] = [], into: Spec[] = []): Spec[] {
  const help = cmd.createHelp();
  const commands = help.visibleCommands(cmd);
  const options = help.visibleOptions(cmd);
  into.push({
    path: path.join(' '),
    commands: commands.map((c) => c.name()),
    flags: options.flatMap((o) => [o.short, o.long].filter((f): f is string => !!f)),
    valued: options.filter((o) => o.required || o.optional).flatMap((o) => [o.short, o.long].filter((f): f is string => !!f).map((f): [string, Kind] => [f, flagKind(o)])),
    args: cmd.registeredArguments.map((a, i) => argKind(path, a, i)),
    variadic: cmd.registeredArguments.at(-1)?.variadic ?? false,
  });
  for (const sub of commands) if (sub.name() !== 'help') commandSpecs(sub, [...path, sub.name()], into);
  return into;
}

/** A word as a shell literal in single quotes. */
const q = (s: string) => `'${s.replaceAll("'", `'\\''`)}'`;

/** The per-command facts as a shell `case` (bash and zsh). */
function bashSpecCase(specs: Spec[]): string {
  return specs
    .map((s) => {
      const args = [...s.args, ...(s.variadic ? ['...'] : [])];
      return (
        `        ${q(s.path)})\n` +
        `            cmds=${q(s.commands.join(' '))}\n` +
        `            flags=${q(s.flags.join(' '))}\n` +
        `            valued=${q(s.valued.map(([f, k]) => `${f}:${k}`).join(' '))}\n` +
        `            args=${q(args.join(' '))} ;;`
      );
    })
    .join('\n');
}

/**
 * Bash (and zsh through bashcompinit): `_orchard` walks the words before the cursor through the
 * command tree, skipping flags and their values (remembering --context), then offers subcommands,
 * flags, or what the next argument or flag value is.
 */
export function bashScript(program: Command): string {
  return `# bash completion for orchard, made by "orchard completion bash" from its commands.
# Install: source <(orchard completion bash)   (in ~/.bashrc), or save it as
# ~/.local/share/bash-completion/completions/orchard
# VM, worker, service account and context names come from "orchard __complete KIND" (the current context).

_orchard_spec() {
    case "$1" in
${bashSpecCase(commandSpecs(program))}
        *) cmds='' flags='' valued='' args='' ;;
    esac
}

# What the value of flag $1 is (see _orchard_spec's valued); fails for a flag without a value.
_orchard_valued() {
    local v
    for v in $valued; do
        if [[ \${v%%:*} == "$1" ]]; then
            printf '%s\\n' "\${v#*:}"
            return 0
        fi
    done
    return 1
}

# COMPREPLY: those of the words that start with $cur (zsh's compgen -W does not filter).
_orchard_match() {
    local w
    COMPREPLY=()
    for w in "$@"; do
        [[ $w == "$cur"* ]] && COMPREPLY+=("$w")
    done
}

_orchard() {
    [[ -n \${ZSH_VERSION-} ]] && setopt localoptions ksharrays shwordsplit nullglob
    local cmd=\${COMP_WORDS[0]} cur=\${COMP_WORDS[COMP_CWORD]} cpath='' cmds flags valued args
    local i w want='' context='' nargs=0 dashdash='' kind='-' prefix=''
    [[ $cur == = ]] && cur=''
    _orchard_spec ''
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=\${COMP_WORDS[i]}
        if [[ -n $want ]]; then
            # The flag's value (bash splits "--context=dev" into --context, =, dev).
            [[ $w == = ]] && continue
            [[ $want == --context ]] && context=$w
            want=''
            continue
        fi
        if [[ -n $dashdash ]]; then
            nargs=$((nargs + 1))
            continue
        fi
        case $w in
            --) dashdash=1; continue ;;
            -*=*) [[ \${w%%=*} == --context ]] && context=\${w#*=}; continue ;;
            -*) _orchard_valued "$w" >/dev/null && want=$w; continue ;;
        esac
        if ((nargs == 0)) && [[ " $cmds " == *" $w "* ]]; then
            cpath=\${cpath:+$cpath }$w
            _orchard_spec "$cpath"
            continue
        fi
        nargs=$((nargs + 1))
    done
    if [[ -n $want ]]; then
        kind=$(_orchard_valued "$want")
    elif [[ -z $dashdash && $cur == -*=* ]] && _orchard_valued "\${cur%%=*}" >/dev/null; then
        # --flag=value as one word (zsh; bash without '=' in COMP_WORDBREAKS)
        kind=$(_orchard_valued "\${cur%%=*}")
        prefix=\${cur%%=*}=
        cur=\${cur#*=}
    elif [[ -z $dashdash && $cur == -* ]]; then
        _orchard_match $flags
        return 0
    elif ((nargs == 0)) && [[ -n $cmds ]]; then
        _orchard_match $cmds
        return 0
    elif [[ -z $dashdash ]]; then
        local -a kinds=($args)
        if ((nargs < \${#kinds[@]})); then
            kind=\${kinds[nargs]}
            [[ $kind == ... ]] && kind=\${kinds[nargs - 1]}
        elif [[ \${kinds[\${#kinds[@]} - 1]-} == ... ]]; then
            kind=\${kinds[\${#kinds[@]} - 2]}
        fi
    fi
    case $kind in
        vms | workers | service-accounts | registries | contexts)
            local -a ctx=()
            [[ -n $context ]] && ctx=(--context "$context")
            local IFS=$'\\n'
            _orchard_match $("$cmd" __complete "$kind" "\${ctx[@]}" 2>/dev/null)
            ;;
        files | dirs)
            if [[ -n \${ZSH_VERSION-} ]]; then
                # bashcompinit's compgen -f/-d list the current directory whatever the prefix
                if [[ $kind == files ]]; then COMPREPLY=("$cur"*); else COMPREPLY=("$cur"*/); fi
            else
                type compopt >/dev/null 2>&1 && compopt -o filenames 2>/dev/null
                COMPREPLY=($(compgen "-\${kind:0:1}" -- "$cur"))
            fi
            ;;
        @*)
            kind=\${kind:1}
            _orchard_match \${kind//,/ }
            ;;
        *) COMPREPLY=() ;;
    esac
    if [[ -n $prefix ]]; then
        for ((i = 0; i < \${#COMPREPLY[@]}; i++)); do COMPREPLY[i]=$prefix\${COMPREPLY[i]}; done
    fi
    return 0
}

complete -F _orchard orchard
`;
}

/** Zsh: the bash function through zsh's bashcompinit (which gives it COMP_WORDS, compgen and complete). */
export function zshScript(program: Command): string {
  return `# zsh completion for orchard, made by "orchard completion zsh" from its commands.
# Install: source <(orchard completion zsh)   (in ~/.zshrc, after compinit)

autoload -U +X compinit && { (( $+functions[compdef] )) || compinit; }
autoload -U +X bashcompinit && bashcompinit

${bashScript(program).replace(/^#.*\n/gm, '')}`;
}

/** The per-command facts as a fish `switch`. */
function fishSpecSwitch(specs: Spec[]): string {
  const list = (xs: string[]) => xs.map(q).join(' ');
  return specs
    .map((s) => {
      const args = [...s.args, ...(s.variadic ? ['...'] : [])];
      return (
        `        case ${q(s.path)}\n` +
        `            set -g __orchard_cmds ${list(s.commands)}\n` +
        `            set -g __orchard_flags ${list(s.flags)}\n` +
        `            set -g __orchard_valued ${list(s.valued.map(([f, k]) => `${f}:${k}`))}\n` +
        `            set -g __orchard_args ${list(args)}`
      );
    })
    .join('\n');
}

/** Fish: the same walk as bash's, in fish. */
export function fishScript(program: Command): string {
  return `# fish completion for orchard, made by "orchard completion fish" from its commands.
# Install: orchard completion fish > ~/.config/fish/completions/orchard.fish
# VM, worker, service account and context names come from "orchard __complete KIND" (the current context).

function __orchard_spec
    switch $argv[1]
${fishSpecSwitch(commandSpecs(program))}
        case '*'
            set -g __orchard_cmds
            set -g __orchard_flags
            set -g __orchard_valued
            set -g __orchard_args
    end
end

function __orchard_valued --argument-names flag
    for v in $__orchard_valued
        set -l parts (string split -m 1 : -- $v)
        if test "$parts[1]" = "$flag"
            echo $parts[2]
            return 0
        end
    end
    return 1
end

function __orchard_values --argument-names kind cmd context
    switch $kind
        case vms workers service-accounts registries contexts
            if test -n "$context"
                $cmd __complete $kind --context $context 2>/dev/null
            else
                $cmd __complete $kind 2>/dev/null
            end
        case files
            __fish_complete_path (commandline -ct | string replace -r '^-[^=]*=' '')
        case dirs
            __fish_complete_directories (commandline -ct | string replace -r '^-[^=]*=' '')
        case '@*'
            string split , -- (string sub -s 2 -- $kind)
    end
end

function __orchard_complete
    set -l words (commandline -opc)
    set -l cur (commandline -ct)
    set -l cmd $words[1]
    set -e words[1]
    set -l cpath ''
    set -l want ''
    set -l context ''
    set -l nargs 0
    set -l dashdash 0
    __orchard_spec ''
    for w in $words
        if test -n "$want"
            test "$want" = --context; and set context $w
            set want ''
            continue
        end
        if test $dashdash = 1
            set nargs (math $nargs + 1)
            continue
        end
        switch $w
            case --
                set dashdash 1
                continue
            case '-*=*'
                string match -q -- '--context=*' $w; and set context (string replace -- '--context=' '' $w)
                continue
            case '-*'
                __orchard_valued $w >/dev/null; and set want $w
                continue
        end
        if test $nargs = 0; and contains -- $w $__orchard_cmds
            set cpath (string trim -- "$cpath $w")
            __orchard_spec $cpath
            continue
        end
        set nargs (math $nargs + 1)
    end
    if test -n "$want"
        __orchard_values (__orchard_valued $want) $cmd "$context"
    else if test $dashdash = 0; and string match -q -- '-*=*' $cur
        set -l flag (string split -m 1 = -- $cur)[1]
        set -l kind (__orchard_valued $flag); or return
        for v in (__orchard_values $kind $cmd "$context")
            echo "$flag=$v"
        end
    else if test $dashdash = 0; and string match -q -- '-*' $cur
        printf '%s\\n' $__orchard_flags
    else if test $nargs = 0; and set -q __orchard_cmds[1]
        printf '%s\\n' $__orchard_cmds
    else if test $dashdash = 0
        set -l i (math $nargs + 1)
        set -l n (count $__orchard_args)
        set -l kind -
        if test $i -le $n
            set kind $__orchard_args[$i]
            test "$kind" = ...; and set kind $__orchard_args[(math $i - 1)]
        else if test $n -ge 2; and test "$__orchard_args[-1]" = ...
            set kind $__orchard_args[-2]
        end
        __orchard_values $kind $cmd "$context"
    end
end

complete -c orchard -f -a '(__orchard_complete)'
`;
}

/** Names of `kind` from the current (or --context's) context, one a line; nothing at all on any error. */
async function namesOf(kind: string, opts: { context?: string }) {
  if (kind === 'contexts') return Object.keys((await loadConfig()).contexts);
  const client = await clientFor(opts);
  try {
    if (kind === 'registries') return (await client.listRegistries()).map((r) => r.host);
    const list = kind === 'vms' ? await client.listVMs() : kind === 'workers' ? await client.listWorkers() : kind === 'service-accounts' ? await client.listServiceAccounts() : [];
    return list.map((x) => x.name);
  } finally {
    client.close();
  }
}

export function registerCompletionCommands(program: Command) {
  program
    .command('completion')
    .description('print a shell completion script: source <(orchard completion bash) (see the README for zsh and fish)')
    .addArgument(new Argument('<shell>', 'bash, zsh or fish').choices(['bash', 'zsh', 'fish']))
    .action((shell: 'bash' | 'zsh' | 'fish') => {
      process.stdout.write(shell === 'bash' ? bashScript(program) : shell === 'zsh' ? zshScript(program) : fishScript(program));
    });
  program
    .command('__complete', { hidden: true })
    .description('names for shell completion: vms, workers, service-accounts, registries or contexts (prints nothing on any error)')
    .argument('<kind>')
    .option('--context <name>')
    .action(async (kind: string, opts: { context?: string }) => {
      // A TAB must not hang on a controller that does not answer: give up quietly.
      setTimeout(() => process.exit(0), COMPLETE_TIMEOUT_MS).unref();
      try {
        const names = await namesOf(kind, opts);
        if (names.length) process.stdout.write(names.join('\n') + '\n');
      } catch {
        // quietly nothing
      }
    });
}
