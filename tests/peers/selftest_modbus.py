#!/usr/bin/env python3
"""Self-test of modbus_dev.py with pymodbus's sync RTU client on the pty link.

Run: python3 tests/peers/selftest_modbus.py   (with pymodbus[serial]==3.16.1). Exit 0 = pass.
Checks: coil read/write (FC01/05/0F), toggle, board-timed pulse at 0x0200+ch (coil seen on,
then off ~N x 100 ms later), discrete inputs after an "input" op, XY-MD02 temperature and
humidity, firmware register, exceptions 02/03, no answer from an unconfigured address and
from a silenced device, address change, quit removes the link.
"""

import json
import os
import queue
import struct
import subprocess
import sys
import tempfile
import threading
import time

from pymodbus import FramerType
from pymodbus.client import ModbusSerialClient
from pymodbus.exceptions import ModbusIOException
from pymodbus.pdu import ModbusPDU

HERE = os.path.dirname(os.path.abspath(__file__))


class RawWriteCoil(ModbusPDU):
    """FC05 with a raw 16-bit value (toggle 0x5500, flash delays)."""

    function_code = 5
    rtu_frame_size = 8

    def __init__(self, address=0, value=0, dev_id=0, transaction_id=0):
        super().__init__(dev_id=dev_id, transaction_id=transaction_id, address=address)
        self.value = value

    def encode(self):
        return struct.pack(">HH", self.address, self.value)

    def decode(self, data):
        self.address, self.value = struct.unpack(">HH", data[:4])


class Peer:
    def __init__(self, args):
        self.p = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "modbus_dev.py")] + args,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self.q = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            ev = json.loads(line)
            assert isinstance(ev["t"], float) and "addr" in ev, ev
            self.q.put(ev)

    def send(self, **op):
        self.p.stdin.write((json.dumps(op) + "\n").encode())
        self.p.stdin.flush()

    def wait(self, pred, timeout=5.0, what=""):
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

    def drain(self):
        time.sleep(0.1)
        while not self.q.empty():
            self.seen.append(self.q.get())
        out, self.seen = self.seen, []
        return out


def ev_is(name, addr=None, **kv):
    def pred(ev):
        if ev["ev"] != name or (addr is not None and ev["addr"] != addr):
            return False
        return all(ev.get(k) == v for k, v in kv.items())

    return pred


def no_answer(call):
    try:
        rr = call()
    except ModbusIOException:
        return True
    return rr is None or (rr.isError() and isinstance(rr, ModbusIOException))


def main():
    tmp = tempfile.mkdtemp(prefix="modbus-selftest-")
    link = os.path.join(tmp, "rs485")
    peer = Peer(["--link", link, "--device", "1:relay8", "--device", "2:relay8d",
                 "--device", "3:io8", "--device", "4:xymd02"])
    ready = peer.wait(ev_is("ready"), what="ready")
    assert ready["link"] == link and os.path.islink(link), ready

    c = ModbusSerialClient(port=link, framer=FramerType.RTU, baudrate=9600, timeout=0.3,
                           retries=0)
    c.register(RawWriteCoil)
    assert c.connect()
    try:
        # --- coils ---
        rr = c.read_coils(0, count=8, device_id=1)
        assert not rr.isError() and rr.bits[:8] == [False] * 8, rr
        t_req = time.monotonic()
        assert not c.write_coil(3, True, device_id=1).isError()
        w = peer.wait(ev_is("write", 1, fc=5, address=3), what="write event")
        assert w["values"] == [0xFF00] and w["exception"] is None, w
        e = peer.wait(ev_is("coil", 1, index=3, on=True), what="coil 3 on")
        print(f"coil event {1000 * (e['t'] - t_req):.1f} ms after the request was issued")
        assert c.read_coils(0, count=8, device_id=1).bits[:8] == [False] * 3 + [True] + [False] * 4
        assert not c.write_coils(0, [True, False, True], device_id=1).isError()
        peer.wait(ev_is("coil", 1, index=0, on=True), what="coil 0 on")
        peer.wait(ev_is("coil", 1, index=2, on=True), what="coil 2 on")
        rr = c.execute(False, RawWriteCoil(address=0, value=0x5500, dev_id=1))  # toggle
        assert not rr.isError() and rr.value == 0x5500, rr
        peer.wait(ev_is("coil", 1, index=0, on=False), what="toggle coil 0 off")
        rr = c.execute(False, RawWriteCoil(address=0x00FF, value=0x0000, dev_id=1))  # all off
        assert not rr.isError()
        assert c.read_coils(0, count=8, device_id=1).bits[:8] == [False] * 8

        # --- board-timed pulse: flash on channel 5 for 3 x 100 ms ---
        rr = c.execute(False, RawWriteCoil(address=0x0205, value=3, dev_id=1))
        assert not rr.isError() and rr.address == 0x0205 and rr.value == 3, rr
        on = peer.wait(ev_is("coil", 1, index=5, on=True), what="pulse on")
        assert c.read_coils(5, count=1, device_id=1).bits[0] is True
        off = peer.wait(ev_is("coil", 1, index=5, on=False, cause="flash"), what="pulse off")
        dt = off["t"] - on["t"]
        assert 0.28 <= dt <= 0.45, f"pulse lasted {dt:.3f} s"
        assert c.read_coils(5, count=1, device_id=1).bits[0] is False

        # --- exceptions ---
        rr = c.read_coils(0, count=9, device_id=1)
        assert rr.isError() and rr.exception_code == 2, rr
        rr = c.read_holding_registers(0x1234, count=1, device_id=1)
        assert rr.isError() and rr.exception_code == 2, rr
        rr = c.read_discrete_inputs(0, count=1, device_id=1)  # plain relay8: no inputs
        assert rr.isError() and rr.exception_code == 2, rr
        rr = c.execute(False, RawWriteCoil(address=1, value=0x1234, dev_id=1))
        assert rr.isError() and rr.exception_code == 3, rr
        rr = c.execute(False, RawWriteCoil(address=0x0201, value=5, dev_id=3))  # io8: no flash
        assert rr.isError() and rr.exception_code == 2, rr
        rr = c.write_register(0x8000, 7, device_id=1)  # read-only firmware register
        assert rr.isError() and rr.exception_code == 2, rr
        assert c.read_holding_registers(0x8000, count=1, device_id=1).registers == [0x0100]
        assert c.read_holding_registers(0x4000, count=1, device_id=2).registers == [2]

        # --- discrete inputs ---
        assert c.read_discrete_inputs(0, count=8, device_id=2).bits[:8] == [False] * 8
        peer.send(op="input", addr=2, index=6, on=True, id=7)
        peer.wait(ev_is("ack", 2, op="input", id=7), what="input ack")
        assert c.read_discrete_inputs(0, count=8, device_id=2).bits[:8] == [False] * 6 + [True, False]
        peer.send(op="input", addr=3, index=0, on=True)
        peer.wait(ev_is("ack", 3, op="input"), what="input ack io8")
        assert c.read_discrete_inputs(0, count=1, device_id=3).bits[0] is True

        # --- XY-MD02 ---
        peer.send(op="temp", addr=4, celsius=-12.3, rh=67.8)
        peer.wait(ev_is("ack", 4, op="temp"), what="temp ack")
        regs = c.read_input_registers(1, count=2, device_id=4).registers
        assert struct.unpack(">h", struct.pack(">H", regs[0]))[0] == -123 and regs[1] == 678, regs
        rr = c.read_input_registers(0, count=1, device_id=4)
        assert rr.isError() and rr.exception_code == 2, rr
        assert c.read_holding_registers(0x0101, count=2, device_id=4).registers == [4, 0]

        # --- silence ---
        assert no_answer(lambda: c.read_coils(0, count=1, device_id=9)), "address 9 answered"
        peer.drain()
        peer.send(op="silent", addr=2, on=True)
        peer.wait(ev_is("ack", 2, op="silent", on=True), what="silent ack")
        assert no_answer(lambda: c.read_coils(0, count=1, device_id=2)), "silent device answered"
        assert no_answer(lambda: c.write_coil(0, True, device_id=2)), "silent device answered"
        assert not any(e["ev"] in ("write", "coil") for e in peer.drain()), "silent device wrote"
        peer.send(op="silent", addr=2, on=False)
        peer.wait(ev_is("ack", 2, op="silent", on=False), what="unsilent ack")
        c.close()
        assert c.connect()
        assert not c.read_coils(0, count=1, device_id=2).isError()

        # --- address change (holding 0x4000) ---
        rr = c.write_register(0x4000, 1, device_id=3)  # taken by device 1
        assert rr.isError() and rr.exception_code == 3, rr
        assert not c.write_register(0x4000, 33, device_id=3).isError()
        peer.wait(ev_is("address", 3, **{"from": 3, "to": 33}), what="address event")
        assert c.read_holding_registers(0x4000, count=1, device_id=33).registers == [33]

        # --- bad lines keep the peer alive ---
        peer.p.stdin.write(b"{not json\n")
        peer.send(op="input", addr=1, index=0, on=True)  # relay8 has no inputs
        peer.send(op="nope", addr=1)
        for _ in range(3):
            peer.wait(ev_is("error"), what="error")
    finally:
        c.close()

    peer.send(op="quit")
    assert peer.p.wait(timeout=5) == 0
    assert not os.path.lexists(link), "link not removed"
    os.rmdir(tmp)
    print("selftest_modbus: PASS")


if __name__ == "__main__":
    main()
