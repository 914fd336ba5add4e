from agent.mqtt.uplink import UplinkPolicy


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_every_nth_input_is_sent() -> None:
    p = UplinkPolicy(every_n=5)
    sent = [i for i in range(20) if p.decide(i).send]
    assert sent == [0, 5, 10, 15]
    assert p.counts == {"every_n": 4, "skipped": 16}


def test_hard_examples_are_sent_even_off_the_grid() -> None:
    p = UplinkPolicy(every_n=0, hard_threshold=0.6)
    decisions = [p.decide(i, conf) for i, conf in enumerate([0.9, 0.5, 0.99, 0.1])]
    assert [d.send for d in decisions] == [False, True, False, True]
    assert decisions[1].reason == "hard"


def test_sample_rate_limit_refills_with_time() -> None:
    clock = FakeClock()
    p = UplinkPolicy(every_n=1, max_samples_per_s=2, clock=clock)
    first = [p.decide(i).send for i in range(5)]
    assert sum(first) == 2  # burst of 2, then limited
    assert p.counts["rate_samples"] == 3
    clock.t += 1.0
    assert sum(p.decide(i).send for i in range(5)) == 2


def test_byte_rate_limit_pauses_until_the_debt_is_paid() -> None:
    clock = FakeClock()
    p = UplinkPolicy(every_n=1, max_bytes_per_s=1000, clock=clock)
    assert p.decide(0).send
    p.charge(3000)  # one large message: 2000 bytes in debt
    assert not p.decide(1).send
    assert p.counts["rate_bytes"] == 1
    clock.t += 1.5
    assert not p.decide(2).send  # still 500 in debt
    clock.t += 1.0
    assert p.decide(3).send
