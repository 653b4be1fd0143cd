# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_tunsec_global_optspecs
    string join \n h/help V/version
end

function __fish_tunsec_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_tunsec_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_tunsec_using_subcommand
    set -l cmd (__fish_tunsec_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c tunsec -n "__fish_tunsec_needs_command" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_needs_command" -s V -l version -d 'Print version'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "pcap" -d 'Apply the engine to a capture file, offline: no TUN, no privileges'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "check" -d 'Parse a setkey(8) file and print the policies and SAs it defines'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "bench" -d 'Measure the engine against the raw crypto primitives (like `openssl speed`)'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "run" -d 'Run the data plane: TUN device, raw sockets, routes and nftables'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "setkey" -d 'Talk to a running daemon like setkey(8): -f FILE, -c, -D, -DP, -F, -FP, -x'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "stats" -d 'Counters of a running daemon: traffic, drops by reason, per-SA rates'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "ike" -d 'Run an IKE daemon (charon, pluto) or `ip xfrm` against a tunsec serving --xfrm: its XFRM netlink reaches tunsec, nothing else changes'
complete -c tunsec -n "__fish_tunsec_needs_command" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c tunsec -n "__fish_tunsec_using_subcommand pcap" -s c -l config -d 'setkey(8) file of the host doing the processing' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand pcap" -s d -l direction -d '`out`: protect plaintext per the outbound SPD; `in`: verify, decrypt and check the inbound SPD' -r -f -a "out\t''
in\t''"
complete -c tunsec -n "__fish_tunsec_using_subcommand pcap" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_using_subcommand check" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l millis -d 'Measuring time per case (engine and primitive each), in ms' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l rounds -d 'Rounds per case (engine and primitive slices alternate); medians are reported' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l sizes -d 'IP packet sizes in bytes' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l only -d 'Only transforms whose name contains one of these' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l peers -d 'Instead: the cost of the number of peers (e.g. 1,100,1000,10000): per packet, per SA and policy change, loading, memory' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l batch -d 'With --peers: packets per call of the engine\'s batch functions (the workers hand it up to 64, what one receive call returns)' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l threads -d 'Instead: workers protecting (and opening) packets of one SA at once against each with its own SA, for each number of threads (e.g. 1,2): ESP aes-gcm-16, the first of --sizes' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -l json -d 'Print one JSON object instead of a table'
complete -c tunsec -n "__fish_tunsec_using_subcommand bench" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -s c -l config -d 'setkey(8) file: policies and (optionally) SAs. Without one, tunsec starts empty, to be keyed at run time (--control, --xfrm)' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -l tun -d 'Name of the TUN device to create' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -l workers -d 'Worker threads (default: the number of CPUs)' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -l control -d 'Control socket path (one per instance). Default: /run/tunsec/TUN.sock in the initial network namespace, /run/tunsec/net-INODE-TUN.sock in any other' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -l xfrm -d 'Serve the Linux XFRM netlink API on this Unix socket (root only), for IKE daemons started with `tunsec ike --xfrm PATH -- DAEMON`' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -l dry-run -d 'Print every change to interfaces, routes, rules and nftables, and exit'
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -l no-offload -d 'Open the TUN device without IFF_VNET_HDR offloads: one packet per read and write (for comparison and for kernels without TUN offload)'
complete -c tunsec -n "__fish_tunsec_using_subcommand run" -s h -l help -d 'Print help (see more with \'--help\')'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s f -d 'Read statements from FILE (setkey -f)' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -l control -d 'The daemon\'s control socket (default: the one daemon of this network namespace that runs with its default path)' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s c -d 'Read statements from standard input (setkey -c)'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s D -d 'Dump the SAD (with -P: the SPD)'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s F -d 'Flush the SAD (with -P: the SPD)'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s P -d 'With -D or -F: the SPD instead of the SAD'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s x -d 'Print events as they happen (setkey -x)'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s k -d 'With -D: show keys'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -l wireshark -d 'With -D: the ESP SAs, keys included (as -k), as lines of Wireshark\'s `esp_sa` file (Wireshark 4.0 names), to decrypt captures: redirect into ~/.config/wireshark/esp_sa'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -l json -d 'Machine-readable output: the daemon\'s JSON replies (one per line)'
complete -c tunsec -n "__fish_tunsec_using_subcommand setkey" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_using_subcommand stats" -l watch -d 'Refresh every SECS seconds, like top' -r
complete -c tunsec -n "__fish_tunsec_using_subcommand stats" -l control -d 'The daemon\'s control socket (default: the one daemon of this network namespace that runs with its default path)' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand stats" -l json -d 'One JSON object (per refresh with --watch)'
complete -c tunsec -n "__fish_tunsec_using_subcommand stats" -l prometheus -d 'The counters in the Prometheus text exposition format (for a node_exporter textfile or a scrape wrapper)'
complete -c tunsec -n "__fish_tunsec_using_subcommand stats" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_using_subcommand ike" -l xfrm -d 'tunsec\'s XFRM socket (`tunsec run --xfrm PATH`)' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand ike" -l library -d 'The preload library (default: beside this binary, then where a package installs it)' -r -F
complete -c tunsec -n "__fish_tunsec_using_subcommand ike" -s h -l help -d 'Print help'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "pcap" -d 'Apply the engine to a capture file, offline: no TUN, no privileges'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "check" -d 'Parse a setkey(8) file and print the policies and SAs it defines'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "bench" -d 'Measure the engine against the raw crypto primitives (like `openssl speed`)'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "run" -d 'Run the data plane: TUN device, raw sockets, routes and nftables'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "setkey" -d 'Talk to a running daemon like setkey(8): -f FILE, -c, -D, -DP, -F, -FP, -x'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "stats" -d 'Counters of a running daemon: traffic, drops by reason, per-SA rates'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "ike" -d 'Run an IKE daemon (charon, pluto) or `ip xfrm` against a tunsec serving --xfrm: its XFRM netlink reaches tunsec, nothing else changes'
complete -c tunsec -n "__fish_tunsec_using_subcommand help; and not __fish_seen_subcommand_from pcap check bench run setkey stats ike help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
