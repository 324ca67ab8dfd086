#!/usr/bin/env python3
"""Self-test of osdp_pd.py: drives it with LibOSDP's own ControlPanel over the pty link.

Run: python3 tests/peers/selftest_osdp.py   (with libosdp==3.2.9 installed). Exit 0 = pass.
Checks: SC with a keyed PD; install-mode PD gets SC under SCBK-D and the CP's automatic KEYSET
(reported with the key), then SC under the new key; a `nosc` PD comes online without SC;
keypress and 26-bit card reach the CP; LED/buzzer/output/text commands are reported; tamper
reaches the CP; a silenced PD goes offline at the CP; quit removes the link.
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import tty

import osdp

HERE = os.path.dirname(os.path.abspath(__file__))
KEY1 = bytes(range(0x40, 0x50))
KEY2 = bytes(range(0xA0, 0xB0))  # the CP's key for the install-mode PD: set by KEYSET
KEY3 = bytes(range(0x10, 0x20))  # the CP has a key for the nosc PD, but the PD has no SC


class Peer:
    def __init__(self, args):
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "osdp_pd.py")] + args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.q = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            ev = json.loads(line)
            assert isinstance(ev["t"], float) and "pd" in ev, ev
            self.q.put(ev)

    def send(self, **op):
        self.p.stdin.write((json.dumps(op) + "\n").encode())
        self.p.stdin.flush()

    def wait(self, pred, timeout=10.0, what=""):
        for ev in self.seen:
            if pred(ev):
                self.seen.remove(ev)
                return ev
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timeout waiting for {what}; unmatched: {self.seen}")
            try:
                ev = self.q.get(timeout=left)
            except queue.Empty:
                continue
            if pred(ev):
                return ev
            self.seen.append(ev)


class TtyChannel(osdp.Channel):
    def __init__(self, path):
        super().__init__()
        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def read(self, max_bytes):
        try:
            return os.read(self.fd, max_bytes)
        except BlockingIOError:
            return b""

    def write(self, buf):
        try:
            return os.write(self.fd, bytes(buf))
        except BlockingIOError:
            return 0

    def flush(self):
        pass


def ev_is(name, pd=None, **kv):
    def pred(ev):
        if ev["ev"] != name or (pd is not None and ev["pd"] != pd):
            return False
        return all(ev.get(k) == v for k, v in kv.items())

    return pred


def main():
    tmp = tempfile.mkdtemp(prefix="osdp-selftest-")
    link = os.path.join(tmp, "osdp0")
    peer = Peer(["--link", link, "--pd", f"1:{KEY1.hex()}", "--pd", "2:install", "--pd", "3:nosc"])
    ready = peer.wait(ev_is("ready"), what="ready")
    assert ready["link"] == link and os.path.islink(link) and ready["pds"] == [1, 2, 3]

    ch = TtyChannel(link)
    cp = osdp.ControlPanel(
        [
            osdp.PDInfo(1, ch, scbk=KEY1),
            osdp.PDInfo(2, ch, scbk=KEY2),
            osdp.PDInfo(3, ch, scbk=KEY3),
        ],
        log_level=osdp.LogLevel.Warning,
    )
    cp.start()
    try:
        # --- secure channel ---
        assert cp.sc_wait(1, timeout=10), "no SC with PD 1"
        peer.wait(ev_is("sc", 1, active=True, scbk_d=False), what="PD 1 sc")
        peer.wait(ev_is("online", 1, online=True), what="PD 1 online")
        # install mode: SC under SCBK-D, the CP sends KEYSET(KEY2), SC again under KEY2
        ks = peer.wait(ev_is("keyset", 2), timeout=15, what="keyset on PD 2")
        assert ks["key"] == KEY2.hex() and ks["type"] == 1, ks
        peer.wait(ev_is("sc", 2, active=True, scbk_d=False), timeout=10, what="PD 2 sc with new key")
        assert cp.sc_wait(2, timeout=10), "no SC with PD 2 after KEYSET"
        # nosc: online without SC
        assert cp.online_wait(3, timeout=10), "PD 3 not online"
        time.sleep(1.0)
        assert not cp.is_sc_active(3), "PD 3 must not have SC"

        # --- keypress ---
        peer.send(op="keys", pd=1, digits="1234#", id="k1")
        sent = peer.wait(ev_is("sent", 1, op="keys", id="k1"), what="keys sent")
        assert sent["data"] == "313233340d", sent
        ev = cp.get_event(1, timeout=5)
        assert ev == {"event": osdp.Event.KeyPress, "reader_no": 0, "data": b"1234\r"}, ev
        peer.wait(ev_is("delivered", 1, event="keypress", ok=True), what="keys delivered")
        peer.send(op="keys", pd=1, digits="7*", each=True, encoding="ascii")
        got = [cp.get_event(1, timeout=5) for _ in range(2)]
        assert [g["data"] for g in got] == [b"7", b"*"], got

        # --- 26-bit card: facility 123, number 4567 (H10301 with parity) ---
        peer.send(op="card", pd=1, facility=123, number=4567)
        sent = peer.wait(ev_is("sent", 1, op="card"), what="card sent")
        ev = cp.get_event(1, timeout=5)
        assert ev["event"] == osdp.Event.CardRead and ev["length"] == 26, ev
        assert ev["format"] == osdp.CardFormat.Wiegand and ev["data"].hex() == sent["hex"], ev
        word = int.from_bytes(ev["data"], "big") >> 6
        assert (word >> 17) & 0xFF == 123 and (word >> 1) & 0xFFFF == 4567, hex(word)
        assert bin(word >> 13).count("1") % 2 == 0 and bin(word & 0x1FFF).count("1") % 2 == 1
        peer.send(op="card", pd=1, bits=26, hex="12345640")
        ev = cp.get_event(1, timeout=5)
        assert ev["data"] == bytes.fromhex("12345640") and ev["length"] == 26, ev

        # --- tamper ---
        peer.send(op="tamper", pd=1, on=True)
        ev = cp.get_event(1, timeout=5)
        assert ev == {"event": osdp.Event.Status, "type": 2, "report": b"\x01\x00"}, ev

        # --- CP commands reach the peer ---
        assert cp.submit_command(1, {"command": osdp.Command.LED, "reader": 0, "led_number": 0,
                                     "control_code": 1, "on_count": 5, "off_count": 5,
                                     "on_color": osdp.CommandLEDColor.Green,
                                     "off_color": osdp.CommandLEDColor.Black,
                                     "temporary": False})
        e = peer.wait(ev_is("led", 1), what="led")
        assert e["on_color"] == 2 and e["on_count"] == 5 and e["temporary"] is False, e
        assert cp.submit_command(1, {"command": osdp.Command.Buzzer, "reader": 0,
                                     "control_code": 2, "on_count": 3, "off_count": 1,
                                     "rep_count": 2})
        e = peer.wait(ev_is("buzzer", 1), what="buzzer")
        assert e["on_count"] == 3 and e["rep_count"] == 2, e
        assert cp.submit_command(2, {"command": osdp.Command.Output, "output_no": 0,
                                     "control_code": 2, "timer_count": 30})
        e = peer.wait(ev_is("output", 2), what="output")
        assert e["output_no"] == 0 and e["control_code"] == 2 and e["timer_count"] == 30, e
        assert cp.submit_command(3, {"command": osdp.Command.Text, "reader": 0, "control_code": 1,
                                     "temp_time": 0, "offset_row": 1, "offset_col": 1,
                                     "data": "HELLO"})
        e = peer.wait(ev_is("text", 3), what="text")
        assert e["data"] == "HELLO", e

        # --- errors keep the peer alive ---
        peer.p.stdin.write(b"this is not json\n")
        peer.send(op="keys", pd=99, digits="1")
        peer.send(op="bogus", pd=1)
        for _ in range(3):
            peer.wait(ev_is("error"), what="error")

        # --- silent PD goes offline at the CP ---
        peer.send(op="silent", pd=1, on=True)
        peer.wait(ev_is("ack", 1, op="silent", on=True), what="silent ack")
        t0 = time.monotonic()
        assert cp.offline_wait(1, timeout=15), "silent PD 1 still online at the CP"
        print(f"PD 1 offline at the CP {time.monotonic() - t0:.1f} s after silence")
        assert cp.is_online(2) and cp.is_online(3), "other PDs must stay online"
        peer.send(op="silent", pd=1, on=False)

        peer.send(op="state")
        st = peer.wait(ev_is("state"), what="state")
        by = {p["pd"]: p for p in st["pds"]}
        assert by[2]["mode"] == "key" and by[2]["key"] == KEY2.hex() and by[3]["mode"] == "nosc"
    finally:
        cp.teardown()

    peer.send(op="quit")
    assert peer.p.wait(timeout=5) == 0
    assert not os.path.lexists(link), "link not removed"
    os.rmdir(tmp)
    print("selftest_osdp: PASS")


if __name__ == "__main__":
    main()
