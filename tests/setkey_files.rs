//! The setkey parser through the public API, on whole files.

use tunsec::sad::Proto;
use tunsec::setkey::{Command, parse};
use tunsec::spd::{Action, Dir, Level, PRIORITY_DEFAULT, Rule};

const HOST_A: &str = r#"#!/usr/sbin/setkey -f
# Host A (10.0.0.1) talking to host B (10.0.0.2).
flush;
spdflush;

add 10.0.0.1 10.0.0.2 esp 0x1001 -m transport -r 64
    -E aes-cbc 0x00112233445566778899aabbccddeeff
    -A hmac-sha256 0x000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f;
add 10.0.0.2 10.0.0.1 esp 0x1002 -m transport -r 64
    -E aes-gcm-16 "0123456789abcdefghij";
add 10.0.0.1 10.0.0.2 ipcomp 0x2001 -C deflate -R;

spdadd 10.0.0.1 10.0.0.2 any -P out ipsec ipcomp/transport//use esp/transport//require;
spdadd 10.0.0.2 10.0.0.1 any -P in  ipsec ipcomp/transport//use esp/transport//require;
spdadd 0.0.0.0/0 0.0.0.0/0 icmp 8 -P out priority 10 none;
"#;

#[test]
fn host_file() {
    let p = parse(HOST_A, "host-a.conf").expect("parses");
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let lines: Vec<usize> = p.statements.iter().map(|s| s.line).collect();
    assert_eq!(lines, [3, 4, 6, 9, 11, 13, 14, 15]);
    match &p.statements[4].cmd {
        Command::Add(c) => assert_eq!(
            (c.proto, c.raw_cpi, c.wire_cpi()),
            (Proto::IpComp, true, 0x2001)
        ),
        c => panic!("{c:?}"),
    }
    match &p.statements[5].cmd {
        Command::SpdAdd {
            dir,
            priority,
            action,
            ..
        } => {
            assert_eq!((*dir, *priority), (Dir::Out, PRIORITY_DEFAULT));
            assert_eq!(
                *action,
                Action::Ipsec(vec![
                    Rule {
                        proto: Proto::IpComp,
                        level: Level::Use
                    },
                    Rule {
                        proto: Proto::Esp,
                        level: Level::Require
                    },
                ])
            );
        }
        c => panic!("{c:?}"),
    }
    match &p.statements[7].cmd {
        Command::SpdAdd {
            selector, priority, ..
        } => {
            assert_eq!(
                (selector.proto, selector.sport, selector.dport, *priority),
                (Some(1), Some(8), None, 10)
            );
        }
        c => panic!("{c:?}"),
    }
}

#[test]
fn errors_name_file_and_line() {
    let text = HOST_A.replace("-E aes-gcm-16", "-E aes-gcm-8");
    let e = parse(&text, "host-a.conf").unwrap_err();
    assert_eq!(e.to_string().split(": ").next(), Some("host-a.conf:10"));
    assert!(
        e.message
            .contains("unknown encryption algorithm \"aes-gcm-8\""),
        "{e}"
    );
}
