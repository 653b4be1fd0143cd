#!/usr/bin/env python3
"""A small keying peer for tests: plays the IKE daemon for both hosts of a
netns setup, through each tunsec daemon's control socket.

It listens for ACQUIRE on both daemons; for the acquiring policy's bundle it
reserves inbound SPIs with getspi on each receiver, completes them there with
update and adds the matching outbound SAs on each sender, with fresh keys
(both directions at once, as IKE makes a pair). On a soft EXPIRE it rekeys
the pair make-before-break: the new SAs are added, the old ones are deleted
a grace period later. Keys come from os.urandom and are never logged.

    scripts/keyd.py --a /run/tunsec/A.sock --b /run/tunsec/B.sock \\
        [--esp aes-gcm-16|aes-cbc] [--soft SECS] [--hard SECS] [--grace SECS]

It prints one line per action (ACQUIRE, KEYED, REKEY, DELETED) on stdout.
"""
import argparse
import json
import os
import select
import socket
import sys
import threading
import time


class Daemon:
    """One tunsec daemon: a request connection and a monitor connection."""

    def __init__(self, name, path):
        self.name = name
        self.path = path
        self.req = self._connect()
        self.mon = self._connect()
        self.lock = threading.Lock()
        reply = self._ask(self.mon, "monitor;")
        if not reply.get("ok"):
            raise SystemExit(f"keyd: {name}: monitor refused: {reply}")

    def _connect(self):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(self.path)
        return s

    @staticmethod
    def _ask(sock, msg):
        sock.send(msg.encode())
        return json.loads(sock.recv(1 << 24))

    def ask(self, msg):
        with self.lock:
            reply = self._ask(self.req, msg)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.name}: {reply.get('error')}")
        return reply

    def policies(self):
        return self.ask("spddump;")["policies"]


def hexkey(n):
    return "0x" + os.urandom(n).hex()


class Keyd:
    def __init__(self, a, b, esp, soft, hard, grace):
        self.d = [a, b]
        self.esp = esp
        self.soft, self.hard, self.grace = soft, hard, grace
        self.pairs = {}  # (src, dst) sorted -> {"spis": set of (dst, proto, spi, src)}
        self.pending = set()
        self.lock = threading.Lock()
        self.rekeys = 0

    def say(self, *words):
        print(" ".join(str(w) for w in words), flush=True)

    def algs(self, proto):
        if proto == "ah":
            return f"-A hmac-sha256 {hexkey(32)}"
        if proto == "ipcomp":
            return "-C deflate"
        if self.esp == "aes-gcm-16":
            return f"-E aes-gcm-16 {hexkey(20)}"
        return f"-E aes-cbc {hexkey(16)} -A hmac-sha256 {hexkey(32)}"

    def owner(self, addr):
        """The daemon whose host has `addr`: the one with an outbound
        policy from it."""
        for d in self.d:
            for p in d.policies():
                if p["dir"] == "out" and p["action"] == "ipsec" and p["src"].split("/")[0] == addr:
                    return d
        raise RuntimeError(f"no daemon has an outbound policy from {addr}")

    def bundle(self, d, policy_id):
        for p in d.policies():
            if p["id"] == policy_id:
                return [r.split("/")[0] for r in p["rules"]]
        return ["esp"]

    def key_pair(self, src, dst, protos, why):
        """SAs src->dst and dst->src for every protocol of the bundle."""
        ds, dd = self.owner(src), self.owner(dst)
        made = []
        lt = f"-ls {self.soft} -lh {self.hard}" if self.soft else ""
        for (s, t, sender, receiver) in [(src, dst, ds, dd), (dst, src, dd, ds)]:
            for proto in protos:
                if proto == "ipcomp":
                    continue  # IPComp is optional inbound; keep the test bundle to ESP/AH
                spi = receiver.ask(f"getspi {s} {t} {proto};")["spis"][0]
                algs = self.algs(proto)
                line = f"{s} {t} {proto} {spi:#x} -r 4096 {lt} {algs};"
                receiver.ask("update " + line)
                sender.ask("add " + line)
                made.append((s, t, proto, spi))
        self.say(why, src, dst, " ".join(f"{p}:{spi:#x}" for (_, _, p, spi) in made))
        return made

    def on_event(self, d, e):
        key = None
        if e.get("event") == "ACQUIRE":
            self.say("ACQUIRE", d.name, e["src"], e["dst"], e["proto"])
            key = tuple(sorted([e["src"], e["dst"]]))
            with self.lock:
                if key in self.pairs or key in self.pending:
                    return
                self.pending.add(key)
            try:
                made = self.key_pair(e["src"], e["dst"], self.bundle(d, e["policy"]), "KEYED")
                with self.lock:
                    self.pairs[key] = {"current": made, "protos": sorted({p for (_, _, p, _) in made})}
            finally:
                self.pending.discard(key)
        elif e.get("event") == "EXPIRE" and e.get("kind") == "soft":
            key = tuple(sorted([e["src"], e["dst"]]))
            with self.lock:
                pair = self.pairs.get(key)
                if not pair or not any(spi == e["spi"] for (_, _, _, spi) in pair["current"]):
                    return  # an old generation, or already rekeyed
                old = pair["current"]
                pair["current"] = []  # claim the rekey
            made = self.key_pair(key[0], key[1], pair["protos"], "REKEY")
            with self.lock:
                pair["current"] = made
                self.rekeys += 1
            threading.Timer(self.grace, self.delete, args=(old,)).start()

    def delete(self, sas):
        for (s, t, proto, spi) in sas:
            for d in self.d:
                try:
                    d.ask(f"delete {s} {t} {proto} {spi:#x};")
                except RuntimeError:
                    pass  # already gone (hard-expired)
        self.say("DELETED", " ".join(f"{p}:{spi:#x}" for (_, _, p, spi) in sas))

    def run(self):
        socks = {d.mon: d for d in self.d}
        while True:
            r, _, _ = select.select(list(socks), [], [], 1.0)
            for s in r:
                data = s.recv(1 << 20)
                if not data:
                    self.say("daemon closed its control socket; exiting")
                    return
                ev = json.loads(data)
                try:
                    self.on_event(socks[s], ev)
                except Exception as exc:  # keep serving the other events
                    self.say("ERROR", exc)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", required=True, help="control socket of host A's daemon")
    ap.add_argument("--b", required=True, help="control socket of host B's daemon")
    ap.add_argument("--esp", default="aes-gcm-16", choices=["aes-gcm-16", "aes-cbc"])
    ap.add_argument("--soft", type=int, default=0, help="soft lifetime in seconds (0: none)")
    ap.add_argument("--hard", type=int, default=0, help="hard lifetime in seconds (0: none)")
    ap.add_argument("--grace", type=float, default=2.0, help="seconds before old SAs are deleted after a rekey")
    a = ap.parse_args()
    k = Keyd(Daemon("A", a.a), Daemon("B", a.b), a.esp, a.soft, a.hard, a.grace)
    k.say("READY")
    try:
        k.run()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
