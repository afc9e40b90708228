"""Tests for lbproxy.core.admission: new entries per source /64 and /48, and who is heavy."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lbproxy.core.admission import PrefixAdmission


def address(net48: int, net64: int, host: int) -> bytes:
    """Address `host` of /64 number `net64` of /48 number `net48` (in 2001:db8::/32)."""
    return (0x2001_0DB8 << 96 | net48 << 80 | net64 << 64 | host).to_bytes(16, "big")


class CountTests(SynchronousTestCase):
    def test_counts_by_64_and_48(self) -> None:
        """Each new entry counts for its /64 and its /48; the host part does not matter."""
        adm = PrefixAdmission()
        for host in range(5):
            adm.count(address(1, 1, host), 0.0)
        for net64 in range(2, 5):
            adm.count(address(1, net64, 9), 0.0)
        self.assertEqual(adm.estimate(address(1, 1, 77), 0.0), (5, 8))
        self.assertEqual(adm.estimate(address(1, 2, 0), 0.0), (1, 8))
        self.assertEqual(adm.estimate(address(2, 1, 0), 0.0), (0, 0))

    def test_window(self) -> None:
        """Counts last at least one window and at most two: the current generation and
        the previous one."""
        adm = PrefixAdmission(window=10.0)
        adm.count(address(1, 1, 1), 0.0)  # the first generation: [0, 10)
        self.assertEqual(adm.estimate(address(1, 1, 1), 9.9)[0], 1)
        adm.count(address(1, 1, 2), 10.0)  # the second: [10, 20), the first kept
        self.assertEqual(adm.estimate(address(1, 1, 1), 19.9)[0], 2)
        self.assertEqual(adm.estimate(address(1, 1, 1), 20.0)[0], 1)  # the first gone
        self.assertEqual(adm.estimate(address(1, 1, 1), 30.0)[0], 0)

    def test_idle_longer_than_two_windows_forgets_all(self) -> None:
        adm = PrefixAdmission(window=1.0)
        adm.count(address(1, 1, 1), 0.0)
        self.assertEqual(adm.estimate(address(1, 1, 1), 5.0), (0, 0))


class HeavyTests(SynchronousTestCase):
    def test_a_busy_64_is_heavy_and_only_it(self) -> None:
        """A /64 that made its limit of new entries is heavy; its neighbours in the same
        /48 and other prefixes are not."""
        adm = PrefixAdmission(per_64=16, per_48=1000)
        for host in range(15):
            adm.count(address(1, 1, host), 0.0)
        self.assertFalse(adm.heavy(address(1, 1, 0), 0.0))
        adm.count(address(1, 1, 99), 0.0)
        self.assertTrue(adm.heavy(address(1, 1, 12345), 0.0))
        self.assertFalse(adm.heavy(address(1, 2, 0), 0.0))
        self.assertFalse(adm.heavy(address(7, 1, 0), 0.0))

    def test_a_busy_48_spread_over_its_64s_is_heavy(self) -> None:
        """New entries spread over the /64s of one /48 (an attacker with a /48) make the
        whole /48 heavy, though no /64 is."""
        adm = PrefixAdmission(per_64=16, per_48=256)
        for net64 in range(256):
            adm.count(address(1, net64, 1), 0.0)
        self.assertTrue(adm.heavy(address(1, 60000, 1), 0.0))
        self.assertEqual(adm.estimate(address(1, 3, 1), 0.0)[0], 1)
        self.assertFalse(adm.heavy(address(2, 3, 1), 0.0))

    def test_a_spread_flood_makes_no_light_prefix_heavy(self) -> None:
        """Many entries from random prefixes (a spoofed flood) fill every cell a little;
        the noise allowance keeps a prefix that made few entries admissible, while a
        concentrated one still stands out."""
        adm = PrefixAdmission(per_64=16, per_48=256, width=1024)
        x = 1
        for _ in range(200_000):
            x = (x * 6364136223846793005 + 1442695040888963407) % (1 << 64)
            adm.count(x.to_bytes(8, "big") * 2, 0.0)
        light = [address(3, n, 1) for n in range(200)]
        for a in light:
            adm.count(a, 0.0)
        self.assertFalse(any(adm.heavy(a, 0.0) for a in light))
        for host in range(2000):
            adm.count(address(4, 4, host), 0.0)
        self.assertTrue(adm.heavy(address(4, 4, 0), 0.0))

    def test_admit_counts_and_refuses_only_when_full(self) -> None:
        """`admit` counts every admitted entry; a heavy prefix is refused only when the
        table is full, and a refusal counts nothing."""
        adm = PrefixAdmission(per_64=4, per_48=1000)
        for host in range(10):
            self.assertTrue(adm.admit(address(1, 1, host), 0.0, False))
        self.assertEqual(adm.estimate(address(1, 1, 0), 0.0), (10, 10))
        self.assertFalse(adm.admit(address(1, 1, 99), 0.0, True))
        self.assertEqual(adm.estimate(address(1, 1, 0), 0.0), (10, 10))
        self.assertTrue(adm.admit(address(1, 2, 1), 0.0, True))
        self.assertEqual(adm.estimate(address(1, 2, 0), 0.0), (1, 11))

    def test_rejects_bad_parameters(self) -> None:
        self.assertRaises(ValueError, PrefixAdmission, window=0)
        self.assertRaises(ValueError, PrefixAdmission, per_64=0)
        self.assertRaises(ValueError, PrefixAdmission, width=1000)
