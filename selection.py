"""Draw which tokens of a reference image Sparse Context keeps, without a model: the command line of
token_selectors.py.

    python selection.py IMAGE --keep 0.1 --selector canny --out sel.png

The image is prepared as sample.py prepares a reference (RGB, at most 1024x1024 px in area,
centre-cropped to multiples of 16 px), so the token grid is the sampler's; dropped tokens are drawn
dark and grey.

May import: files, klein, token_selectors.
"""

from files import ArgumentParser, check_number, check_writable, fail, image_format, load_image, write_atomic
from klein import PATCH, prepare_reference
from token_selectors import SELECTORS, draw_selection, select_reference_tokens


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("image", help="input image file")
    p.add_argument("--keep", type=float, default=0.1, help="fraction of tokens kept, (0, 1]")
    p.add_argument("--selector", choices=SELECTORS, default="canny", help="map that weights the draw")
    p.add_argument("--out", required=True, help="output image, e.g. sel.png (.png, .jpg, .webp)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--uniform-mix", type=float, default=0.25, help="uniform share mixed into the map's probabilities, in [0, 1]")
    args = p.parse_args(argv)
    try:  # every option and file checked before any work; nothing is written on an error
        if not 0 < args.keep <= 1:  # NaN fails too
            raise ValueError(f"--keep must be in (0, 1], got {args.keep}")
        check_number("--uniform-mix", args.uniform_mix, 0, 1)
        check_number("--seed", args.seed, 0, 2**63 - 1, integer=True)
        image_format(args.out)
        check_writable(args.out, "--out")
        image = prepare_reference(load_image(args.image))
        kept = select_reference_tokens([image], args.keep, args.selector, args.seed, args.uniform_mix)[0]
        write_atomic(args.out, draw_selection(image, kept))
    except (OSError, ValueError) as e:
        fail(" ".join(str(e).split()))
    n = (image.width // PATCH) * (image.height // PATCH)
    print(f"kept {len(kept)} of {n} tokens ({args.selector}, keep {args.keep}) -> {args.out}")


if __name__ == "__main__":
    main()
