"""Noise saved by the tighter accountant (issue 15): sigma calibrated with ``rdp`` vs ``prv``.

For typical digits sites (n private examples, batch 32, one private epoch per round, 20
rounds; q = 1/ceil(n/32), T = 20 ceil(1/q) steps) at the default delta
(:func:`fedkd.privacy.default_delta`) and target epsilon 1, 4 and 8, prints the noise
multiplier each accountant calibrates (:func:`fedkd.privacy.calibrate_noise_multiplier`),
the saving 1 - sigma_prv / sigma_rdp, and the epsilon that the RDP-calibrated sigma
certifies under ``prv`` (the budget RDP leaves unused). With ``--pld`` it also prints
Google's independent PLD accountant (``dp_accounting``) at the PRV sigma. No assertions;
it takes a minute or two (PRV calibrations).

    python -m simulations.micro.accountant_noise [--sizes 100,318] [--pld]
"""

from __future__ import annotations

import argparse
import time

from fedkd.privacy import calibrate_noise_multiplier, default_delta, epsilon_for, sample_rate_for, steps_for


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,318", help="comma-separated site sizes n")
    parser.add_argument("--epsilons", default="1,4,8")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pld", action="store_true", help="also Google's dp_accounting PLD at the PRV sigma")
    args = parser.parse_args(argv)
    print("| n | q | steps | delta | target eps | sigma rdp | sigma prv | noise saved | prv eps at rdp sigma |"
          + (" PLD eps at prv sigma |" if args.pld else "") + " seconds |")
    print("|---|---|---|---|---|---|---|---|---|" + ("---|" if args.pld else "") + "---|")
    for n in (int(s) for s in args.sizes.split(",")):
        q = sample_rate_for(num_examples=n, batch_size=args.batch_size)
        steps = steps_for(epochs=1, sample_rate=q) * args.rounds
        delta = default_delta(n)
        for target in (float(e) for e in args.epsilons.split(",")):
            start = time.perf_counter()
            common = dict(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
            rdp = calibrate_noise_multiplier(**common, accountant="rdp")
            prv = calibrate_noise_multiplier(**common, accountant="prv")
            unused = epsilon_for(noise_multiplier=rdp, sample_rate=q, steps=steps, delta=delta, accountant="prv")
            pld = ""
            if args.pld:
                import dp_accounting
                from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

                acc = PLDAccountant(value_discretization_interval=1e-4)
                acc.compose(dp_accounting.SelfComposedDpEvent(
                    dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(prv)), steps))
                pld = f" {acc.get_epsilon(delta):.3f} |"
            print(f"| {n} | {q:.4f} | {steps} | {delta:.1e} | {target:g} | {rdp:.3f} | {prv:.3f} | "
                  f"{1 - prv / rdp:.1%} | {unused:.2f} |{pld} {time.perf_counter() - start:.1f} |", flush=True)


if __name__ == "__main__":
    main()
