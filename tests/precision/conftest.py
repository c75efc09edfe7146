import torch


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal bit patterns everywhere, except that any NaN matches any NaN (payloads may differ)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = torch.isnan(actual)
    assert torch.equal(nan, torch.isnan(expected)), "NaN positions differ"
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}[actual.dtype]
    a = actual[~nan].view(int_dtype)
    b = expected[~nan].view(int_dtype)
    mismatch = a != b
    assert not bool(mismatch.any()), (
        f"{int(mismatch.sum())} values differ, e.g. {actual[~nan][mismatch][:4].tolist()} "
        f"vs {expected[~nan][mismatch][:4].tolist()}"
    )
