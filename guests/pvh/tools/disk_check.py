#!/usr/bin/env python3
"""Checks a disk image written by the guest's `disk` workload (README.md).

Usage: disk_check.py IMAGE [AREA_BYTES]

Decodes the stamp of every sector in the area (default: the whole image): a sector that is all
zeros was never written; any other must carry its own sector number and a valid check of its
filler. Prints the number of written blocks, the highest sequence number (= the guest's last
`writes=`), and `disk checksum=<16 hex>` as the guest computes it after its last round, which
must equal the guest's own line for the same area. Exits 1 on any bad sector.
"""

import struct
import sys

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK = (1 << 64) - 1
SECTOR = 512
BLOCK = 4096


def fnv_words(words, hash_=FNV_OFFSET):
    for word in words:
        hash_ = ((hash_ ^ word) * FNV_PRIME) & MASK
    return hash_


def main():
    path = sys.argv[1]
    with open(path, "rb") as image:
        data = image.read(int(sys.argv[2]) if len(sys.argv) > 2 else -1)
    if len(data) % BLOCK:
        sys.exit("area is not a multiple of 4 KiB")
    bad = 0
    written_blocks = 0
    max_sequence = 0
    disk_hash = FNV_OFFSET
    for block in range(len(data) // BLOCK):
        words = struct.unpack_from("<512Q", data, block * BLOCK)
        disk_hash = fnv_words([fnv_words(words)], disk_hash)
        if not any(words):
            continue
        written_blocks += 1
        sequences = set()
        for index in range(8):
            sector = block * 8 + index
            sector_words = words[index * 64 : (index + 1) * 64]
            stamp_sector, sequence, round_check = sector_words[:3]
            check = fnv_words(sector_words[3:])
            check = (check ^ (check >> 32)) & 0xFFFFFFFF
            problems = []
            if stamp_sector != sector:
                problems.append(f"sector number {stamp_sector}")
            if round_check >> 32 != check:
                problems.append(f"check {round_check >> 32:#x}, computed {check:#x}")
            if problems:
                bad += 1
                if bad <= 10:
                    print(f"sector {sector}: " + ", ".join(problems))
            sequences.add(sequence)
            max_sequence = max(max_sequence, sequence)
        if len(sequences) != 1:
            bad += 1
            print(f"block {block}: sectors from different writes {sorted(sequences)}")
    print(f"written blocks={written_blocks} max sequence={max_sequence} bad sectors={bad}")
    print(f"disk checksum={disk_hash:016x}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
