"""The seed homework's worked example, computed by the library."""


def conv_walkthrough() -> None:
    print("jaxconv demo")
