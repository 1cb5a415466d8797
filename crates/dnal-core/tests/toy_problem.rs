//! The whole DNAL loop on the core demo's toy problem: the gates must find exactly the four
//! informative inputs, and the derived network must be much cheaper at no loss of accuracy.

#[path = "../examples/gate_demo.rs"]
mod demo;

#[test]
fn dnal_finds_the_informative_inputs() {
    let outcome = demo::run();
    assert_eq!(outcome.kept_inputs, vec![3, 11, 19, 27]);
    let (before, after) = outcome.macs;
    assert!(
        after * 20 < before,
        "at least 20x fewer MACs: {before} -> {after}"
    );
    let (dense, pruned) = outcome.accuracy;
    assert!(
        dense > 0.95 && pruned >= dense - 0.01,
        "accuracy {dense} -> {pruned}"
    );
}
