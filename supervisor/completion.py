"""Shell completion scripts for supctl: `supctl completion bash|zsh`.

The scripts complete commands, options, signal names and streams by themselves, and
ask the daemon for process names (`supctl completion names`: processes, programs and
groups, one a line) with the -s/-c options already on the command line, so they
complete against the daemon the command will talk to. Without a daemon there is
simply nothing to offer. Imported only by that command (supctl starts fast).
"""

from __future__ import annotations

from collections.abc import Sequence

SIGNALS = ("TERM", "HUP", "INT", "KILL", "QUIT", "USR1", "USR2", "STOP", "CONT")
GLOBAL_OPTIONS = ("-s", "--socket", "-c", "--config", "--json", "--timeout", "--trust-uid")
COMMAND_OPTIONS = {
    "status": ("-l", "--long", "--json"),
    "start": ("--no-wait", "--json"),
    "stop": ("--no-wait", "--json"),
    "restart": ("--no-wait", "--json"),
    "tail": ("-f", "--follow", "-n", "--lines", "-c", "--bytes", "--json"),
    "reload": ("--json",),
}

_BASH = r"""# bash completion for supctl.
# Install: supctl completion bash > /etc/bash_completion.d/supctl
# (or add `eval "$(supctl completion bash)"` to ~/.bashrc).
_supctl_names() {
    # words and connection are _supctl's (bash scoping is dynamic).
    "${words[0]}" "${connection[@]}" completion names 2>/dev/null
}

_supctl() {
    local line="${COMP_LINE:0:COMP_POINT}" cur="" cmd="" prev="" i
    local -a words connection args
    read -r -a words <<< "$line"
    # The word under the cursor, colons included ("web:1"): bash splits at ":".
    if [[ "$line" != *[[:space:]] ]]; then
        cur="${words[${#words[@]}-1]}"
        unset 'words[${#words[@]}-1]'
    fi
    (( ${#words[@]} > 1 )) && prev="${words[${#words[@]}-1]}"
    for ((i = 1; i < ${#words[@]}; i++)); do
        case "${words[i]}" in
            -s|--socket|-c|--config)
                [[ -z "$cmd" ]] && connection+=("${words[i]}" "${words[i+1]}")
                [[ -z "$cmd" || "$cmd" == tail ]] && ((i++)) ;;
            --timeout|--trust-uid|-n|--lines|--bytes) ((i++)) ;;
            -*) ;;
            *) if [[ -z "$cmd" ]]; then cmd="${words[i]}"; else args+=("${words[i]}"); fi ;;
        esac
    done
    local candidates=""
    case "$prev" in
        -s|--socket|-c|--config)
            if [[ -z "$cmd" ]]; then COMPREPLY=($(compgen -f -- "$cur")); return; fi ;;
        --timeout|--trust-uid|-n|--lines|--bytes) COMPREPLY=(); return ;;
    esac
    if [[ -z "$cmd" ]]; then
        if [[ "$cur" == -* ]]; then candidates="@GLOBAL_OPTIONS@"; else candidates="@COMMANDS@"; fi
    elif [[ "$cur" == -* ]]; then
        case "$cmd" in
@OPTION_CASES@
        esac
    else
        case "$cmd" in
            help) (( ${#args[@]} == 0 )) && candidates="@COMMANDS@" ;;
            completion) (( ${#args[@]} == 0 )) && candidates="bash zsh" ;;
            signal)
                if (( ${#args[@]} == 0 )); then candidates="@SIGNALS@"
                else candidates="$(_supctl_names) all"; fi ;;
            tail)
                if (( ${#args[@]} == 0 )); then
                    candidates="$(_supctl_names)"
                elif (( ${#args[@]} == 1 )); then candidates="stdout stderr"; fi ;;
            pid|fg|why)
                (( ${#args[@]} == 0 )) && candidates="$(_supctl_names)" ;;
            start|stop|restart)
                candidates="$(_supctl_names) all" ;;
            status|usage|clear|wait|logs)
                candidates="$(_supctl_names)" ;;
        esac
    fi
    local IFS=$'\n'
    COMPREPLY=($(compgen -W "${candidates//[[:space:]]/$'\n'}" -- "$cur"))
    # bash replaces only the part after the last ":" of the word: trim the rest.
    if [[ "$cur" == *:* && "$COMP_WORDBREAKS" == *:* ]]; then
        local prefix="${cur%"${cur##*:}"}"
        COMPREPLY=("${COMPREPLY[@]#"$prefix"}")
    fi
}
complete -F _supctl supctl
"""

_ZSH = r"""#compdef supctl
# zsh completion for supctl. Install: supctl completion zsh > "${fpath[1]}/_supctl"
# (or add `source <(supctl completion zsh)` to ~/.zshrc after compinit).
_supctl_names() {
    local -a connection names
    local i
    for ((i = 2; i < CURRENT; i++)); do
        case ${words[i]} in
            -s|--socket|-c|--config) connection+=(${words[i]} ${words[i+1]}) ;;
        esac
    done
    names=(${(f)"$(${words[1]} $connection completion names 2>/dev/null)"})
    (( $# )) && names+=($@)
    compadd -Q -- $names
}

_supctl() {
    local context state state_descr line
    typeset -A opt_args
    local -a commands
    commands=(@ZSH_COMMANDS@)
    _arguments -C \
        '(-s --socket)'{-s,--socket}'[control socket]:socket:_files' \
        '(-c --config)'{-c,--config}'[supd config file]:config:_files' \
        '--json[print results as JSON]' \
        '--timeout[give up after S seconds]:seconds:' \
        '*--trust-uid[also trust a daemon of this uid]:uid:' \
        '1:command:->command' \
        '*::argument:->argument'
    case $state in
        command) _describe -t commands 'supctl command' commands ;;
        argument)
            case ${words[1]} in
                help) _describe -t commands 'supctl command' commands ;;
                completion) compadd bash zsh ;;
                signal)
                    if (( CURRENT == 2 )); then compadd @SIGNALS@
                    else _supctl_names all; fi ;;
                tail)
                    if [[ ${words[CURRENT]} == -* ]]; then compadd -- @TAIL_OPTIONS@
                    elif (( CURRENT == 2 )); then _supctl_names
                    else compadd stdout stderr; fi ;;
                start|stop|restart) _supctl_names all ;;
                status|usage|pid|fg|why|clear|wait|logs) _supctl_names ;;
            esac ;;
    esac
}

if [[ ${zsh_eval_context[-1]} == loadautofunc ]]; then
    _supctl "$@"
else
    compdef _supctl supctl
fi
"""

DESCRIPTIONS = {
    "status": "show processes",
    "start": "start processes",
    "stop": "stop processes",
    "restart": "restart processes",
    "signal": "send a signal to processes",
    "reload": "re-read the config and apply the changes",
    "update": "apply the config's changes (= reload)",
    "reread": "show what a reload would change",
    "avail": "list the programs of the running config",
    "tail": "show the end of a process's output",
    "fg": "follow a process's output",
    "pid": "print a pid",
    "usage": "CPU and memory of processes",
    "metrics": "print the OpenMetrics text",
    "version": "show the daemon's version",
    "shutdown": "stop everything and the daemon",
    "completion": "print a completion script",
    "help": "show help for a command",
}


def script(shell: str, commands: Sequence[str]) -> str:
    """The completion script for `shell` ("bash" or "zsh")."""
    listed = " ".join(commands)
    if shell == "bash":
        cases = "\n".join(
            f'            {name}) candidates="{" ".join(options)}" ;;'
            for name, options in COMMAND_OPTIONS.items()
        )
        return (
            _BASH.replace("@OPTION_CASES@", cases)
            .replace("@GLOBAL_OPTIONS@", " ".join(GLOBAL_OPTIONS))
            .replace("@COMMANDS@", listed)
            .replace("@SIGNALS@", " ".join(SIGNALS))
        )
    described = " ".join(f"'{name}:{DESCRIPTIONS.get(name, name)}'" for name in commands)
    return (
        _ZSH.replace("@ZSH_COMMANDS@", described)
        .replace("@SIGNALS@", " ".join(SIGNALS))
        .replace("@TAIL_OPTIONS@", " ".join(COMMAND_OPTIONS["tail"]))
    )
