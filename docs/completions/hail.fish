# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_hail_global_optspecs
    string join \n profile= profiles-dir= activate-timeout= job-uri= netrc-file= state-dir= lock-timeout= timeout= nix-timeout= output= system= latest-finished wait-for-jobset gate-job= min-build-age= keep-generations= metrics-file= dry-run retry-failed force oneshot poll-period= nixos-operation= confirm-timeout= allow-reboot reboot-window= h/help V/version
end

function __fish_hail_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_hail_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_hail_using_subcommand
    set -l cmd (__fish_hail_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c hail -n "__fish_hail_needs_command" -l profile -d 'The profile to deploy: PROFILES_DIR/PROFILE (may contain \'/\', e.g. hail-profiles/web)' -r
complete -c hail -n "__fish_hail_needs_command" -l profiles-dir -d 'Where profiles live' -r -F
complete -c hail -n "__fish_hail_needs_command" -l activate-timeout -d 'Seconds bin/activate may run before it is ended (its process group, or its transient unit under systemd)' -r
complete -c hail -n "__fish_hail_needs_command" -l job-uri -d 'The Hydra job to follow: http(s)://HOST[:PORT][/PREFIX]/job/PROJECT/JOBSET/JOB' -r
complete -c hail -n "__fish_hail_needs_command" -l netrc-file -d 'netrc file with HTTP Basic credentials for the job URI\'s host (the `machine` entry for it, else `default`) [default: /etc/netrc if it exists]' -r -F
complete -c hail -n "__fish_hail_needs_command" -l state-dir -d 'Where hail keeps per-profile state and locks [default: $STATE_DIRECTORY, else /var/lib/hail]' -r -F
complete -c hail -n "__fish_hail_needs_command" -l lock-timeout -d 'Seconds to wait for another pass on the same profile to finish' -r
complete -c hail -n "__fish_hail_needs_command" -l timeout -d 'Seconds each HTTP exchange may take [default: 10 to connect, 60 in all]' -r
complete -c hail -n "__fish_hail_needs_command" -l nix-timeout -d 'Seconds each nix call (realising the build, switching the profile, rolling back, deleting generations) may take before its process group is ended: a stuck substitution must not hold the profile lock forever' -r
complete -c hail -n "__fish_hail_needs_command" -l output -d 'The build output to deploy, for jobs whose deployable output is not `out`' -r
complete -c hail -n "__fish_hail_needs_command" -l system -d 'Only builds for this system (Hydra\'s latest-for/SYSTEM); otherwise the highest build id of any system wins' -r
complete -c hail -n "__fish_hail_needs_command" -l gate-job -d 'Only this job\'s build from the evaluation in which JOB, a job of the same jobset that succeeds only when everything that must does (an aggregate such as releaseTools.aggregate), last succeeded. Small requests whatever the jobset\'s size: while JOB\'s latest build is unchanged, one' -r
complete -c hail -n "__fish_hail_needs_command" -l min-build-age -d 'Deploy a build only once it has been finished this long (e.g. 30min, 2h, 1d; plain numbers are seconds): canary hosts at 0, the fleet later' -r
complete -c hail -n "__fish_hail_needs_command" -l keep-generations -d 'After a successful deploy, delete all but the newest N generations (never the current one)' -r
complete -c hail -n "__fish_hail_needs_command" -l metrics-file -d 'Write Prometheus metrics for this profile here after every pass (atomically; point it into node_exporter\'s textfile directory)' -r -F
complete -c hail -n "__fish_hail_needs_command" -l poll-period -d 'Not supported: the original\'s polling loop is systemd\'s job now' -r
complete -c hail -n "__fish_hail_needs_command" -l nixos-operation -d 'What the new system\'s bin/switch-to-configuration does: switch (activate it now and make it the boot default) or boot (only the boot default). With --allow-reboot: boot when the system needs a reboot, switch otherwise' -r -f -a "switch\t'Activate it now and make it the boot default'
boot\t'Make it the boot default only: it runs from the next boot'"
complete -c hail -n "__fish_hail_needs_command" -l confirm-timeout -d 'After a switch, seconds hail keeps trying to reach Hydra (its JOB/latest) before it rolls the switch back as failed; 0 does not check' -r
complete -c hail -n "__fish_hail_needs_command" -l reboot-window -d 'Reboot only between these local times (e.g. 02:00-04:30; may wrap midnight); outside it the reboot stays pending for a later pass. Needs --allow-reboot' -r
complete -c hail -n "__fish_hail_needs_command" -l latest-finished -d 'Only builds from evaluations with no unfinished builds (Hydra\'s latest-finished)'
complete -c hail -n "__fish_hail_needs_command" -l wait-for-jobset -d 'Only this job\'s build from the newest evaluation in which every build finished successfully (reads up to 3 pages of evaluations and the builds of up to 10, each evaluation once: while Hydra\'s newest finished evaluation is unchanged, one small request)'
complete -c hail -n "__fish_hail_needs_command" -l dry-run -d 'Ask Hydra and say what a pass would do now (deploy, or why it would hold, wait or refuse); change nothing'
complete -c hail -n "__fish_hail_needs_command" -l retry-failed -d 'Deploy Hydra\'s latest build even if its activation failed before (failed builds are otherwise not retried while they are the latest)'
complete -c hail -n "__fish_hail_needs_command" -l force -d 'Deploy Hydra\'s latest build even if an operator rolled the profile back from it (hail otherwise holds until a newer build appears)'
complete -c hail -n "__fish_hail_needs_command" -l oneshot -d 'Accepted for compatibility; every run is one pass'
complete -c hail -n "__fish_hail_needs_command" -l allow-reboot -d 'When the new system\'s kernel, initrd or kernel modules differ from the booted system\'s, make it the boot default (switch-to-configuration boot) and reboot (systemctl reboot); otherwise switch. Without it hail always uses --nixos-operation and reports "reboot required"'
complete -c hail -n "__fish_hail_needs_command" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c hail -n "__fish_hail_needs_command" -s V -l version -d 'Print version'
complete -c hail -n "__fish_hail_needs_command" -f -a "activate" -d 'Boot-time activation: run PROFILE/bin/activate if the profile exists (exits 0 if it does not); a failure is recorded, and the next passes run the activation again (up to 3 failures in a row)'
complete -c hail -n "__fish_hail_needs_command" -f -a "status" -d 'Show what hail deployed and how its last passes went, from the state dir only (no network, no lock: works while a pass runs)'
complete -c hail -n "__fish_hail_needs_command" -f -a "service" -d 'Install, (re)start and health-check a service profile\'s systemd units (what `lib.mkServiceProfile`\'s bin/activate runs), or take them down'
complete -c hail -n "__fish_hail_needs_command" -f -a "manager" -d 'Make this host run exactly the hail instances a manager profile lists (what `lib.mkManagerProfile`\'s bin/activate runs), or take them down'
complete -c hail -n "__fish_hail_needs_command" -f -a "activation-finished" -d 'The transient activation unit\'s ExecStopPost=: record how the activation ended (from systemd\'s $SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS) for the next pass'
complete -c hail -n "__fish_hail_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hail -n "__fish_hail_using_subcommand activate" -l profile -d 'The profile to deploy: PROFILES_DIR/PROFILE (may contain \'/\', e.g. hail-profiles/web)' -r
complete -c hail -n "__fish_hail_using_subcommand activate" -l profiles-dir -d 'Where profiles live' -r -F
complete -c hail -n "__fish_hail_using_subcommand activate" -l activate-timeout -d 'Seconds bin/activate may run before it is ended (its process group, or its transient unit under systemd)' -r
complete -c hail -n "__fish_hail_using_subcommand activate" -l job-uri -d 'The Hydra job the profile is deployed from (the instance\'s HAIL_JOB_URI): hail refuses to activate a profile that it deployed from another job' -r
complete -c hail -n "__fish_hail_using_subcommand activate" -l state-dir -d 'Where hail keeps per-profile state and locks [default: $STATE_DIRECTORY, else /var/lib/hail]' -r -F
complete -c hail -n "__fish_hail_using_subcommand activate" -l lock-timeout -d 'Seconds to wait for another pass on the same profile to finish' -r
complete -c hail -n "__fish_hail_using_subcommand activate" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand status" -l state-dir -d 'Where hail keeps its state [default: $STATE_DIRECTORY, else /var/lib/hail]' -r -F
complete -c hail -n "__fish_hail_using_subcommand status" -l json -d 'A stable JSON document for scripts instead of a table'
complete -c hail -n "__fish_hail_using_subcommand status" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand service; and not __fish_seen_subcommand_from activate deactivate help" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand service; and not __fish_seen_subcommand_from activate deactivate help" -f -a "activate" -d 'Install the units in PROFILE_DIR/lib/systemd/system, restart the changed ones, start the others, remove dropped ones, then run PROFILE_DIR/bin/health-check until it passes'
complete -c hail -n "__fish_hail_using_subcommand service; and not __fish_seen_subcommand_from activate deactivate help" -f -a "deactivate" -d 'Stop and remove every unit the service installed'
complete -c hail -n "__fish_hail_using_subcommand service; and not __fish_seen_subcommand_from activate deactivate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from activate" -l name -d 'The service\'s name (one service profile per name)' -r
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from activate" -l unit-dir -d 'Where units are installed; the runtime dir is empty after a reboot, when hail-activate@ installs them again' -r -F
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from activate" -l health-timeout -d 'Seconds the health check may take to pass' -r
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from activate" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from deactivate" -l name -d 'The service\'s name (one service profile per name)' -r
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from deactivate" -l unit-dir -d 'Where units are installed; the runtime dir is empty after a reboot, when hail-activate@ installs them again' -r -F
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from deactivate" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from help" -f -a "activate" -d 'Install the units in PROFILE_DIR/lib/systemd/system, restart the changed ones, start the others, remove dropped ones, then run PROFILE_DIR/bin/health-check until it passes'
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from help" -f -a "deactivate" -d 'Stop and remove every unit the service installed'
complete -c hail -n "__fish_hail_using_subcommand service; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hail -n "__fish_hail_using_subcommand manager; and not __fish_seen_subcommand_from activate deactivate help" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand manager; and not __fish_seen_subcommand_from activate deactivate help" -f -a "activate" -d 'Set up the instances in INSTANCES (JSON: {"name": {"jobUri": …, "pollPeriod": …, "profile": …, "netrcFile": …, "activateAtBoot": …, "environment": {…}}}) and remove the ones no longer listed'
complete -c hail -n "__fish_hail_using_subcommand manager; and not __fish_seen_subcommand_from activate deactivate help" -f -a "deactivate" -d 'Remove every instance this manager set up'
complete -c hail -n "__fish_hail_using_subcommand manager; and not __fish_seen_subcommand_from activate deactivate help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from activate" -l config-dir -d 'Where instance environment files go (hail@.service reads /etc/hail/%I.env)' -r -F
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from activate" -l unit-dir -d 'Where timer drop-ins for poll periods go' -r -F
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from activate" -l profiles-dir -d 'Where the instances\' profiles live (for their bin/deactivate)' -r -F
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from activate" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from deactivate" -l config-dir -d 'Where instance environment files go (hail@.service reads /etc/hail/%I.env)' -r -F
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from deactivate" -l unit-dir -d 'Where timer drop-ins for poll periods go' -r -F
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from deactivate" -l profiles-dir -d 'Where the instances\' profiles live (for their bin/deactivate)' -r -F
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from deactivate" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from help" -f -a "activate" -d 'Set up the instances in INSTANCES (JSON: {"name": {"jobUri": …, "pollPeriod": …, "profile": …, "netrcFile": …, "activateAtBoot": …, "environment": {…}}}) and remove the ones no longer listed'
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from help" -f -a "deactivate" -d 'Remove every instance this manager set up'
complete -c hail -n "__fish_hail_using_subcommand manager; and __fish_seen_subcommand_from help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hail -n "__fish_hail_using_subcommand activation-finished" -l state-dir -r -F
complete -c hail -n "__fish_hail_using_subcommand activation-finished" -l profile -r
complete -c hail -n "__fish_hail_using_subcommand activation-finished" -l store-path -d 'The store path that was activated' -r
complete -c hail -n "__fish_hail_using_subcommand activation-finished" -l timeout -d 'The activation\'s timeout, for saying that it ran past it' -r
complete -c hail -n "__fish_hail_using_subcommand activation-finished" -s h -l help -d 'Print help'
complete -c hail -n "__fish_hail_using_subcommand help; and not __fish_seen_subcommand_from activate status service manager activation-finished help" -f -a "activate" -d 'Boot-time activation: run PROFILE/bin/activate if the profile exists (exits 0 if it does not); a failure is recorded, and the next passes run the activation again (up to 3 failures in a row)'
complete -c hail -n "__fish_hail_using_subcommand help; and not __fish_seen_subcommand_from activate status service manager activation-finished help" -f -a "status" -d 'Show what hail deployed and how its last passes went, from the state dir only (no network, no lock: works while a pass runs)'
complete -c hail -n "__fish_hail_using_subcommand help; and not __fish_seen_subcommand_from activate status service manager activation-finished help" -f -a "service" -d 'Install, (re)start and health-check a service profile\'s systemd units (what `lib.mkServiceProfile`\'s bin/activate runs), or take them down'
complete -c hail -n "__fish_hail_using_subcommand help; and not __fish_seen_subcommand_from activate status service manager activation-finished help" -f -a "manager" -d 'Make this host run exactly the hail instances a manager profile lists (what `lib.mkManagerProfile`\'s bin/activate runs), or take them down'
complete -c hail -n "__fish_hail_using_subcommand help; and not __fish_seen_subcommand_from activate status service manager activation-finished help" -f -a "activation-finished" -d 'The transient activation unit\'s ExecStopPost=: record how the activation ended (from systemd\'s $SERVICE_RESULT, $EXIT_CODE, $EXIT_STATUS) for the next pass'
complete -c hail -n "__fish_hail_using_subcommand help; and not __fish_seen_subcommand_from activate status service manager activation-finished help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c hail -n "__fish_hail_using_subcommand help; and __fish_seen_subcommand_from service" -f -a "activate" -d 'Install the units in PROFILE_DIR/lib/systemd/system, restart the changed ones, start the others, remove dropped ones, then run PROFILE_DIR/bin/health-check until it passes'
complete -c hail -n "__fish_hail_using_subcommand help; and __fish_seen_subcommand_from service" -f -a "deactivate" -d 'Stop and remove every unit the service installed'
complete -c hail -n "__fish_hail_using_subcommand help; and __fish_seen_subcommand_from manager" -f -a "activate" -d 'Set up the instances in INSTANCES (JSON: {"name": {"jobUri": …, "pollPeriod": …, "profile": …, "netrcFile": …, "activateAtBoot": …, "environment": {…}}}) and remove the ones no longer listed'
complete -c hail -n "__fish_hail_using_subcommand help; and __fish_seen_subcommand_from manager" -f -a "deactivate" -d 'Remove every instance this manager set up'
