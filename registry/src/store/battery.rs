//! The test battery every `Store` implementation passes.

use std::sync::Arc;

use super::backend::{Op, Store, Table};

pub(crate) async fn run(store: &dyn Store) {
    empty_tables(store).await;
    put_get_delete(store).await;
    batches_are_atomic_and_ordered(store).await;
    tables_are_separate(store).await;
    insert_if_absent_is_exclusive(store).await;
}

async fn empty_tables(store: &dyn Store) {
    for t in Table::ALL {
        assert!(store.list(t).await.unwrap().is_empty(), "{t} starts empty");
    }
    assert_eq!(store.get(Table::Catalog, "missing").await.unwrap(), None);
    // Deleting what is not there is not an error.
    store.delete(Table::Catalog, "missing").await.unwrap();
}

async fn put_get_delete(store: &dyn Store) {
    store
        .put(Table::Catalog, "Service/c1/a.example", b"one".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store
            .get(Table::Catalog, "Service/c1/a.example")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"one"[..])
    );
    store
        .put(Table::Catalog, "Service/c1/a.example", b"two".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store
            .get(Table::Catalog, "Service/c1/a.example")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"two"[..])
    );
    store
        .delete(Table::Catalog, "Service/c1/a.example")
        .await
        .unwrap();
    assert_eq!(
        store
            .get(Table::Catalog, "Service/c1/a.example")
            .await
            .unwrap(),
        None
    );
    // Binary values and empty values round-trip.
    let bin: Vec<u8> = (0..=255).collect();
    store.put(Table::Catalog, "bin", bin.clone()).await.unwrap();
    store
        .put(Table::Catalog, "empty", Vec::new())
        .await
        .unwrap();
    assert_eq!(store.get(Table::Catalog, "bin").await.unwrap(), Some(bin));
    assert_eq!(
        store.get(Table::Catalog, "empty").await.unwrap(),
        Some(Vec::new())
    );
    store
        .apply(
            Table::Catalog,
            vec![Op::Delete("bin".into()), Op::Delete("empty".into())],
        )
        .await
        .unwrap();
}

async fn batches_are_atomic_and_ordered(store: &dyn Store) {
    let ops = (0..100)
        .map(|i| Op::Put(format!("k{i:03}"), vec![i as u8]))
        .collect();
    store.apply(Table::Catalog, ops).await.unwrap();
    let all = store.list(Table::Catalog).await.unwrap();
    assert_eq!(all.len(), 100);
    // Later ops in a batch win over earlier ones on the same key.
    store
        .apply(
            Table::Catalog,
            vec![
                Op::Put("k000".into(), b"x".to_vec()),
                Op::Delete("k000".into()),
                Op::Put("k001".into(), b"a".to_vec()),
                Op::Put("k001".into(), b"b".to_vec()),
            ],
        )
        .await
        .unwrap();
    assert_eq!(store.get(Table::Catalog, "k000").await.unwrap(), None);
    assert_eq!(
        store.get(Table::Catalog, "k001").await.unwrap().as_deref(),
        Some(&b"b"[..])
    );
    let ops = (0..100).map(|i| Op::Delete(format!("k{i:03}"))).collect();
    store.apply(Table::Catalog, ops).await.unwrap();
    assert!(store.list(Table::Catalog).await.unwrap().is_empty());
    // A batch larger than a backend's own limit on one transaction (etcd's 128 operations
    // by default) is written whole, in order, and listed back in full.
    let ops = (0..2500)
        .map(|i| Op::Put(format!("big{i:04}"), vec![(i % 251) as u8; 16]))
        .chain(
            (0..2500)
                .step_by(2)
                .map(|i| Op::Delete(format!("big{i:04}"))),
        )
        .collect();
    store.apply(Table::Catalog, ops).await.unwrap();
    let all = store.list(Table::Catalog).await.unwrap();
    assert_eq!(all.len(), 1250);
    assert!(all
        .iter()
        .all(|(k, v)| k[3..].parse::<usize>().unwrap() % 2 == 1 && v.len() == 16));
    let ops = all.into_iter().map(|(k, _)| Op::Delete(k)).collect();
    store.apply(Table::Catalog, ops).await.unwrap();
    assert!(store.list(Table::Catalog).await.unwrap().is_empty());
}

async fn tables_are_separate(store: &dyn Store) {
    store
        .put(Table::Catalog, "same", b"catalog".to_vec())
        .await
        .unwrap();
    store
        .put(Table::RedeemedTokens, "same", b"token".to_vec())
        .await
        .unwrap();
    store
        .put(Table::Vips, "same", b"vip".to_vec())
        .await
        .unwrap();
    assert_eq!(
        store.get(Table::Catalog, "same").await.unwrap().as_deref(),
        Some(&b"catalog"[..])
    );
    assert_eq!(
        store
            .get(Table::RedeemedTokens, "same")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"token"[..])
    );
    store.delete(Table::Catalog, "same").await.unwrap();
    assert_eq!(
        store.get(Table::Vips, "same").await.unwrap().as_deref(),
        Some(&b"vip"[..])
    );
    store.delete(Table::Vips, "same").await.unwrap();
    store.delete(Table::RedeemedTokens, "same").await.unwrap();
}

async fn insert_if_absent_is_exclusive(store: &dyn Store) {
    assert!(store
        .insert_if_absent(Table::RedeemedTokens, "jti-1", b"1".to_vec())
        .await
        .unwrap());
    assert!(!store
        .insert_if_absent(Table::RedeemedTokens, "jti-1", b"2".to_vec())
        .await
        .unwrap());
    assert_eq!(
        store
            .get(Table::RedeemedTokens, "jti-1")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"1"[..])
    );
    store.delete(Table::RedeemedTokens, "jti-1").await.unwrap();
}

/// Concurrent redeemers of one token: exactly one wins.
pub(crate) async fn concurrent_insert_if_absent(store: Arc<dyn Store>) {
    concurrent_insert_if_absent_across(&[store]).await
}

/// Concurrent redeemers of one token spread over `stores` (several registries on one
/// shared store): exactly one wins.
pub(crate) async fn concurrent_insert_if_absent_across(stores: &[Arc<dyn Store>]) {
    let store = &stores[0];
    let mut tasks = Vec::new();
    for i in 0..16u8 {
        let s = stores[i as usize % stores.len()].clone();
        tasks.push(tokio::spawn(async move {
            s.insert_if_absent(Table::RedeemedTokens, "race", vec![i])
                .await
                .unwrap()
        }));
    }
    let mut winners = 0;
    for t in tasks {
        if t.await.unwrap() {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
    store.delete(Table::RedeemedTokens, "race").await.unwrap();
}

pub(crate) async fn write_durable_sample(store: &dyn Store) {
    store
        .put(Table::Catalog, "Network//net-a", b"a".to_vec())
        .await
        .unwrap();
    assert!(store
        .insert_if_absent(Table::RedeemedTokens, "jti", b"9".to_vec())
        .await
        .unwrap());
}

pub(crate) async fn check_durable_sample(store: &dyn Store) {
    assert_eq!(
        store
            .get(Table::Catalog, "Network//net-a")
            .await
            .unwrap()
            .as_deref(),
        Some(&b"a"[..])
    );
    assert!(!store
        .insert_if_absent(Table::RedeemedTokens, "jti", b"9".to_vec())
        .await
        .unwrap());
}
